"""Alembic operations for the outbox, and what autogenerate needs to leave its tables to them.

Importing this module (in `env.py`) registers three operations:

- `op.create_outbox(table="outbox", schema=None)`: everything `Outbox.create()` makes: the
  tables, indexes, constraints, the sequence at `CACHE 1`, and the PostgreSQL trigger functions
  and triggers (SQLite: the key trigger). Its reverse is `op.drop_outbox()`.
- `op.drop_outbox(table="outbox", schema=None)`: removes all of that (not the schema).
- `op.upgrade_outbox(table="outbox", schema=None, to_version=SCHEMA_VERSION)`: brings an outbox
  made by an earlier version (schema 1: outbox-relay 0.1.0) to this version in place.

Why the operations run `outbox.ddl` and not alembic's `create_table`: the triggers and functions
are not tables, so a migration made of `create_table` calls would give an outbox the relay
refuses to run on. Online, `create_outbox` and `upgrade_outbox` run `outbox.ddl.create()`, the
code behind `outbox-relay init-db`: both are idempotent and converge to the installed version's
outbox, so a migration history replayed on an empty database ends where an upgraded one does.
Offline (`alembic upgrade --sql`) they print `outbox.ddl.ddl_statements()`, the SQL of
`outbox-relay init-db --sql`.

Autogenerate would see the outbox's tables on the application's `MetaData` and write
`create_table` calls for them. `include_object` (pass it to `context.configure`) leaves them
out; the comparator registered here writes `op.create_outbox()` instead when the database has
no outbox, and `op.upgrade_outbox()` when it has one that `outbox.ddl.check()` finds incomplete
or older. If `include_object` is missing, autogenerate fails with a message saying to add it,
rather than writing a migration that would create the tables twice.

This is the only module that imports alembic (the `alembic` extra).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

try:
    from alembic.autogenerate import comparators, renderers
    from alembic.autogenerate.api import AutogenContext
    from alembic.operations import MigrateOperation, Operations
    from alembic.operations.ops import UpgradeOps
    from alembic.util import CommandError
except ImportError as exc:
    raise ImportError(
        f"outbox.alembic needs Alembic ({exc}): pip install 'outbox-relay[alembic]'"
    ) from exc

from outbox.ddl import check, create, ddl_statements, drop_statements
from outbox.errors import OutboxError
from outbox.schema import DEFAULT_TABLE, INFO_KEY, SCHEMA_VERSION, Outbox

__all__ = [
    "CreateOutboxOp",
    "DropOutboxOp",
    "OutboxMigrationError",
    "UpgradeOutboxOp",
    "include_object",
]

# Under alembic's logger: the `alembic.ini` that `alembic init` writes shows it at INFO, so
# whoever runs `alembic upgrade` reads what an upgrade changed (keys held by dead letters).
logger = logging.getLogger("alembic.outbox")


class OutboxMigrationError(OutboxError, CommandError):
    """A migration cannot do what it asks of the outbox: `env.py` lacks the outbox's filter,
    the migration needs a newer outbox-relay, or it cannot be written as SQL ahead of time.

    A `CommandError` too, so the alembic command prints the message (not a traceback)."""


class _OutboxOp(MigrateOperation):
    def __init__(self, table: str = DEFAULT_TABLE, schema: str | None = None) -> None:
        self.table = table
        self.schema = schema

    def outbox(self) -> Outbox:
        # A MetaData of its own: the migration must not depend on the application's models.
        return Outbox(sa.MetaData(), table=self.table, schema=self.schema)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        """What `compare_metadata()` lists for this operation."""
        return (type(self).__name__, self.table, self.schema)

    def arguments(self) -> str:
        """The call's arguments as Python source, for autogenerate."""
        parts = [] if self.table == DEFAULT_TABLE else [f"table={self.table!r}"]
        if self.schema is not None:
            parts.append(f"schema={self.schema!r}")
        return ", ".join(parts)


@Operations.register_operation("create_outbox")
class CreateOutboxOp(_OutboxOp):
    """`op.create_outbox()`: the outbox of the installed version, complete."""

    @classmethod
    def create_outbox(
        cls, operations: Operations, table: str = DEFAULT_TABLE, schema: str | None = None
    ) -> None:
        operations.invoke(cls(table, schema))

    def reverse(self) -> DropOutboxOp:
        return DropOutboxOp(self.table, self.schema)


@Operations.register_operation("drop_outbox")
class DropOutboxOp(_OutboxOp):
    """`op.drop_outbox()`: tables, triggers and trigger functions."""

    @classmethod
    def drop_outbox(
        cls, operations: Operations, table: str = DEFAULT_TABLE, schema: str | None = None
    ) -> None:
        operations.invoke(cls(table, schema))

    def reverse(self) -> CreateOutboxOp:
        return CreateOutboxOp(self.table, self.schema)


@Operations.register_operation("upgrade_outbox")
class UpgradeOutboxOp(_OutboxOp):
    """`op.upgrade_outbox()`: an outbox of an earlier schema version, upgraded in place."""

    def __init__(
        self,
        table: str = DEFAULT_TABLE,
        schema: str | None = None,
        to_version: int = SCHEMA_VERSION,
    ) -> None:
        super().__init__(table, schema)
        self.to_version = to_version

    @classmethod
    def upgrade_outbox(
        cls,
        operations: Operations,
        table: str = DEFAULT_TABLE,
        schema: str | None = None,
        to_version: int = SCHEMA_VERSION,
    ) -> None:
        operations.invoke(cls(table, schema, to_version))

    def reverse(self) -> _IrreversibleUpgrade:
        return _IrreversibleUpgrade(self.table, self.schema)

    def arguments(self) -> str:
        return ", ".join(a for a in (super().arguments(), f"to_version={self.to_version}") if a)


class _IrreversibleUpgrade(_OutboxOp):
    """What autogenerate writes into `downgrade()` for an upgrade: nothing to run. Relays of
    the earlier version would be refused by the upgraded outbox anyway."""


# -- what the operations do ------------------------------------------------------------------


def _run(operations: Operations, statements: Iterable[str]) -> None:
    for statement in statements:
        # DDL, not text(): no bind parameters in trigger bodies. '%' would be formatting.
        operations.execute(sa.DDL(statement.replace("%", "%%")))  # type: ignore[no-untyped-call]


def _converge(operations: Operations, outbox: Outbox) -> None:
    if operations.migration_context.as_sql:
        _run(operations, ddl_statements(outbox, operations.migration_context.dialect))
        return
    report = create(outbox, operations.get_bind())
    for change in report.changes:
        logger.info("%s: %s", outbox.qualified_name, change)


@Operations.implementation_for(CreateOutboxOp)
def _create_outbox(operations: Operations, operation: CreateOutboxOp) -> None:
    _converge(operations, operation.outbox())


@Operations.implementation_for(UpgradeOutboxOp)
def _upgrade_outbox(operations: Operations, operation: UpgradeOutboxOp) -> None:
    if operation.to_version > SCHEMA_VERSION:
        raise OutboxMigrationError(
            f"this migration upgrades the outbox to schema {operation.to_version}, but the "
            f"installed outbox-relay knows schema {SCHEMA_VERSION} at most: upgrade outbox-relay"
        )
    context = operations.migration_context
    if context.as_sql and context.dialect.name == "sqlite":
        # On SQLite the upgrade reads which keys dead letters hold from the rows (see
        # outbox.ddl.create): static SQL would release them, and lose the relay's new column.
        raise OutboxMigrationError(
            "op.upgrade_outbox() cannot write SQL for SQLite ahead of time: run this "
            "migration online (alembic upgrade without --sql)"
        )
    _converge(operations, operation.outbox())


@Operations.implementation_for(DropOutboxOp)
def _drop_outbox(operations: Operations, operation: DropOutboxOp) -> None:
    _run(operations, drop_statements(operation.outbox(), operations.migration_context.dialect))


# -- autogenerate ----------------------------------------------------------------------------


def include_object(
    obj: Any,
    name: str | None,
    type_: str,
    reflected: bool,
    compare_to: Any,
) -> bool:
    """For `context.configure(include_object=...)`: leave the outbox's tables (and everything
    on them) to `op.create_outbox`, and compare every other object as usual.

    An outbox in the database that the target metadata does not declare (the application
    writes with `Outbox()` on a MetaData of its own) is left alone too: autogenerate would
    otherwise write `drop_table` for its tables, and the migration would delete every event.

    To combine it with a filter of your own: `return include_object(...) and mine(...)`."""
    table = obj if type_ == "table" else getattr(obj, "table", None)
    for candidate in (table, compare_to if type_ == "table" else None):
        if isinstance(candidate, sa.Table) and INFO_KEY in candidate.info:
            return False
    return not (reflected and isinstance(table, sa.Table) and _looks_like_an_outbox_table(table))


# The columns each outbox table has had in every schema version (1 and 2; `<table>_key` is
# new in 2): what recognises an outbox's table reflected from the database, which carries no
# `info`. A name alone would be a guess; these column sets are not.
_SIGNATURES = {
    "": frozenset(
        {
            "seq",
            "id",
            "type",
            "key",
            "aggregate_type",
            "aggregate_id",
            "routing_key",
            "correlation_id",
            "version",
            "payload",
            "headers",
            "occurred_at",
            "status",
            "attempts",
            "next_attempt_at",
            "last_error",
            "published_at",
            "claimed_by",
            "claim_token",
            "lease_until",
        }
    ),
    "_key": frozenset({"key", "available_at", "held", "lease_token", "leased_by"}),
    "_failure": frozenset({"id", "event_id", "attempt", "failed_at", "relay", "error"}),
    "_relay": frozenset({"name", "host", "pid", "started_at", "heartbeat_at"}),
}


def _looks_like_an_outbox_table(table: sa.Table) -> bool:
    columns = set(table.columns.keys())
    return any(
        (not suffix or table.name.endswith(suffix)) and signature <= columns
        for suffix, signature in _SIGNATURES.items()
    )


def _outboxes(autogen_context: AutogenContext) -> list[Outbox]:
    """The outboxes on the target metadata: each marks its events table with its own name."""
    found = []
    for table in autogen_context.sorted_tables:
        if table.info.get(INFO_KEY) == table.name:
            found.append(Outbox(sa.MetaData(), table=table.name, schema=table.schema))
            if autogen_context.run_object_filters(table, table.name, "table", False, None):
                raise OutboxMigrationError(
                    f"autogenerate would create the outbox tables of {table.fullname} with "
                    "create_table, without their triggers: pass "
                    "include_object=outbox.alembic.include_object to context.configure() in "
                    "env.py (op.create_outbox creates them)"
                )
    return found


@comparators.dispatch_for("schema")
def _compare_outboxes(
    autogen_context: AutogenContext, upgrade_ops: UpgradeOps, schemas: Any
) -> None:
    """Missing outbox: `create_outbox`. An outbox `check()` finds wanting: `upgrade_outbox`."""
    connection = autogen_context.connection
    if connection is None:  # alembic never autogenerates offline
        return
    for outbox in _outboxes(autogen_context):
        if not sa.inspect(connection).has_table(outbox.name, schema=outbox.schema):
            upgrade_ops.ops.append(CreateOutboxOp(outbox.name, outbox.schema))
            continue
        found = check(outbox, connection)
        if found.errors or found.warnings:
            for problem in (*found.errors, *found.warnings):
                logger.info("%s: %s", outbox.qualified_name, problem)
            upgrade_ops.ops.append(UpgradeOutboxOp(outbox.name, outbox.schema))


def _prefix(autogen_context: AutogenContext) -> str:
    return str(autogen_context.opts.get("alembic_module_prefix") or "op.")


@renderers.dispatch_for(CreateOutboxOp)
def _render_create(autogen_context: AutogenContext, op: CreateOutboxOp) -> str:
    return f"{_prefix(autogen_context)}create_outbox({op.arguments()})"


@renderers.dispatch_for(DropOutboxOp)
def _render_drop(autogen_context: AutogenContext, op: DropOutboxOp) -> str:
    return f"{_prefix(autogen_context)}drop_outbox({op.arguments()})"


@renderers.dispatch_for(UpgradeOutboxOp)
def _render_upgrade(autogen_context: AutogenContext, op: UpgradeOutboxOp) -> str:
    return f"{_prefix(autogen_context)}upgrade_outbox({op.arguments()})"


@renderers.dispatch_for(_IrreversibleUpgrade)
def _render_irreversible(autogen_context: AutogenContext, op: _IrreversibleUpgrade) -> str:
    # `pass`: it may be the only statement of downgrade().
    return "pass  # the outbox's own upgrade is not undone: earlier relays could not use it"
