"""The outbox tables as SQLAlchemy Core, on the application's own `MetaData`.

Defining the tables on the caller's metadata lets Alembic autogenerate see them. PostgreSQL
also gets a trigger (see `_POSTGRES_TRIGGERS`): Alembic does not see triggers, so migrations
should run `Outbox.ddl_statements()` or `outbox-relay init-db --sql` output once.

Why a trigger: a sequence hands out numbers at insert, not at commit. If transaction T1
inserts row 1 of key K and commits after T2 inserted and committed row 2 of K, a relay would
see row 2 first and publish it before row 1. The trigger takes a transaction-scoped advisory
lock on the key before it numbers the row, so writers of one key number their rows in commit
order and the committed rows of a key are always a gap-free prefix of its order. Writers of
different keys never wait for each other; rows without a key take no lock.
"""

from __future__ import annotations

import hashlib
import re

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.schema import CreateIndex, CreateTable, DDLElement

from outbox.errors import OutboxError

DEFAULT_TABLE = "outbox"
PENDING = "pending"
PUBLISHED = "published"
DEAD = "dead"
STATUSES = (PENDING, PUBLISHED, DEAD)

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,47}$")

_POSTGRES_TRIGGERS = """
CREATE OR REPLACE FUNCTION {fn_order}() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.key IS NOT NULL THEN
        -- Writers of one key queue here, so they number their rows in commit order.
        PERFORM pg_advisory_xact_lock(hashtextextended(NEW.key, {lock_seed}));
        NEW.seq := nextval('{sequence}');
    END IF;
    RETURN NEW;
END
$fn$;
DROP TRIGGER IF EXISTS {name}_order_by_key ON {table};
CREATE TRIGGER {name}_order_by_key BEFORE INSERT ON {table}
    FOR EACH ROW EXECUTE FUNCTION {fn_order}();
CREATE OR REPLACE FUNCTION {fn_notify}() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    -- Delivered at commit, and only if the transaction commits: the relay wakes at once.
    PERFORM pg_notify('{channel}', '');
    RETURN NULL;
END
$fn$;
DROP TRIGGER IF EXISTS {name}_notify ON {table};
CREATE TRIGGER {name}_notify AFTER INSERT ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {fn_notify}();
"""


def _stable_int63(text: str) -> int:
    """A stable 63-bit number for `text` (Python's hash() changes between processes)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


class Outbox:
    """The outbox tables of one application: events, their failure history, live relays.

    >>> metadata = sa.MetaData()
    >>> outbox = Outbox(metadata)                    # table "outbox"
    >>> outbox = Outbox(metadata, table="events", schema="app")
    """

    def __init__(
        self,
        metadata: sa.MetaData | None = None,
        *,
        table: str = DEFAULT_TABLE,
        schema: str | None = None,
    ) -> None:
        for what, value in (("table", table), ("schema", schema)):
            if value is not None and not _IDENTIFIER.match(value):
                raise OutboxError(
                    f"outbox {what} name {value!r} is not a plain SQL identifier: use letters, "
                    "digits and underscores, at most 48 characters, not starting with a digit"
                )
        self.metadata = metadata if metadata is not None else sa.MetaData()
        self.name = table
        self.schema = schema
        self.qualified_name = f"{schema}.{table}" if schema else table
        # LISTEN/NOTIFY channel; also namespaces this outbox's advisory locks.
        self.channel = self.qualified_name
        self.events = _events_table(self.metadata, table, schema)
        self.failures = _failures_table(self.metadata, table, schema)
        self.relays = _relays_table(self.metadata, table, schema)
        self.claim_lock_id = _stable_int63(f"outbox-claim:{self.qualified_name}")
        self._key_lock_seed = _stable_int63(f"outbox-key:{self.qualified_name}")

    @property
    def tables(self) -> list[sa.Table]:
        return [self.events, self.failures, self.relays]

    def create(self, bind: sa.Engine | Connection) -> None:
        """Create what is missing (tables, sequence, indexes, triggers); safe to run again."""
        if isinstance(bind, sa.Engine):
            with bind.begin() as connection:
                self.create(connection)
            return
        if self.schema and bind.dialect.name == "postgresql":
            bind.execute(sa.schema.CreateSchema(self.schema, if_not_exists=True))
        self.metadata.create_all(bind, tables=self.tables, checkfirst=True)
        for statement in self._postgres_trigger_ddl(bind.dialect):
            bind.exec_driver_sql(statement)

    def drop(self, bind: sa.Engine | Connection) -> None:
        """Drop the outbox tables and sequence (tests and teardown only)."""
        if isinstance(bind, sa.Engine):
            with bind.begin() as connection:
                self.drop(connection)
            return
        self.metadata.drop_all(bind, tables=self.tables, checkfirst=True)

    def ddl_statements(self, dialect: Dialect | None = None) -> list[str]:
        """The DDL `create()` would run, as SQL text, for teams that apply migrations themselves."""
        if dialect is None:
            from sqlalchemy.dialects import postgresql

            dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
        elements: list[DDLElement] = []
        if dialect.name == "postgresql" and self.schema:
            elements.append(sa.schema.CreateSchema(self.schema, if_not_exists=True))
        for table in self.tables:
            elements.append(CreateTable(table, if_not_exists=True))
            # Sorted: table.indexes is a set, and the DDL text should not change between runs.
            indexes = sorted(table.indexes, key=lambda index: str(index.name))
            elements.extend(CreateIndex(index, if_not_exists=True) for index in indexes)
        statements = [str(element.compile(dialect=dialect)).strip() for element in elements]
        return statements + self._postgres_trigger_ddl(dialect)

    def _postgres_trigger_ddl(self, dialect: Dialect) -> list[str]:
        if dialect.name != "postgresql":
            return []
        prefix = f"{self.schema}." if self.schema else ""
        script = _POSTGRES_TRIGGERS.format(
            name=self.name,
            table=self.qualified_name,
            # PostgreSQL's name for the identity sequence of column "seq".
            sequence=f"{prefix}{self.name}_seq_seq",
            fn_order=f"{prefix}{self.name}_order_by_key",
            fn_notify=f"{prefix}{self.name}_notify",
            channel=self.channel,
            lock_seed=self._key_lock_seed,
        )
        return _split_sql(script)


def _split_sql(script: str) -> list[str]:
    """Split on statement ends outside dollar-quoted function bodies."""
    statements, current, in_body = [], [], False
    for line in script.strip().splitlines():
        current.append(line)
        if line.count("$fn$") % 2:
            in_body = not in_body
        if not in_body and line.rstrip().endswith(";"):
            statements.append("\n".join(current).rstrip().rstrip(";"))
            current = []
    return statements


def _events_table(metadata: sa.MetaData, name: str, schema: str | None) -> sa.Table:
    # On SQLite a plain INTEGER PRIMARY KEY is the rowid: monotonic in a single-writer database.
    seq_type = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    ts = sa.DateTime(timezone=True)
    pending = sa.text(f"status = '{PENDING}'")
    return sa.Table(
        name,
        metadata,
        # Write order: the relay delivers the events of one key in `seq` order.
        sa.Column("seq", seq_type, sa.Identity(), primary_key=True),
        sa.Column("id", sa.Uuid(), nullable=False, unique=True),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("key", sa.Text()),
        sa.Column("aggregate_type", sa.Text()),
        sa.Column("aggregate_id", sa.Text()),
        sa.Column("routing_key", sa.Text(), nullable=False),
        sa.Column("correlation_id", sa.Text()),
        sa.Column("version", sa.Integer(), nullable=False, server_default="1"),
        # JSON text, published byte for byte.
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("headers", sa.Text()),
        sa.Column("occurred_at", ts, nullable=False),
        # Relay state.
        sa.Column("status", sa.String(16), nullable=False, server_default=PENDING),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", ts),
        sa.Column("last_error", sa.Text()),
        sa.Column("published_at", ts),
        sa.Column("claimed_by", sa.Text()),
        sa.Column("claim_token", sa.Uuid()),
        sa.Column("lease_until", ts),
        sa.CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + ")",
            name=f"{name}_status_valid",
        ),
        # The claim scans pending rows in write order: small however large the table grows.
        sa.Index(
            f"{name}_pending_idx",
            "seq",
            postgresql_where=pending,
            sqlite_where=pending,
        ),
        sa.Index(
            f"{name}_dead_idx",
            "key",
            "seq",
            postgresql_where=sa.text(f"status = '{DEAD}'"),
            sqlite_where=sa.text(f"status = '{DEAD}'"),
        ),
        sa.Index(
            f"{name}_published_idx",
            "published_at",
            postgresql_where=sa.text(f"status = '{PUBLISHED}'"),
            sqlite_where=sa.text(f"status = '{PUBLISHED}'"),
        ),
        schema=schema,
        # Never reuse a purged rowid: write order must only grow.
        sqlite_autoincrement=True,
    )


def _failures_table(metadata: sa.MetaData, name: str, schema: str | None) -> sa.Table:
    id_type = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    return sa.Table(
        f"{name}_failure",
        metadata,
        sa.Column("id", id_type, sa.Identity(), primary_key=True),
        sa.Column("event_id", sa.Uuid(), nullable=False, index=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("relay", sa.Text()),
        sa.Column("error", sa.Text(), nullable=False),
        schema=schema,
    )


def _relays_table(metadata: sa.MetaData, name: str, schema: str | None) -> sa.Table:
    ts = sa.DateTime(timezone=True)
    return sa.Table(
        f"{name}_relay",
        metadata,
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", ts, nullable=False),
        sa.Column("heartbeat_at", ts, nullable=False),
        schema=schema,
    )
