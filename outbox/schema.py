"""The outbox tables as SQLAlchemy Core, on the application's own `MetaData`.

Defining the tables on the caller's metadata lets Alembic autogenerate see them. The triggers
that number rows per key and track which keys have pending events are not tables: `create()`
(or `outbox-relay init-db`, or the SQL of `ddl_statements()`, or `op.create_outbox()` in an
Alembic migration, see `outbox.alembic`) installs them, and the relay refuses to run on a table
without them (see `outbox.ddl`).

Tables:
- `<table>`: the events, in write order (`seq`). A row with a key is written by the
  application once (INSERT) and by a relay once more when it is published (UPDATE, or DELETE
  without retention); a row without a key also carries its own lease (written at each claim
  and renewal).
- `<table>_key`: one row per ordering key that has (or may have) pending events: its place in
  the relays' round-robin, its lease, its retry time, and whether a dead event holds it. Keys
  are what relays claim (`FOR UPDATE SKIP LOCKED`), so leases cost one write per key and run,
  not one per event.
- `<table>_failure`: the history of failed attempts.
- `<table>_relay`: live relays and their heartbeats.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect

from outbox.errors import OutboxError

if TYPE_CHECKING:
    from outbox.ddl import SchemaReport

DEFAULT_TABLE = "outbox"
PENDING = "pending"
PUBLISHED = "published"
DEAD = "dead"
STATUSES = (PENDING, PUBLISHED, DEAD)
SCHEMA_VERSION = 2

INFO_KEY = "outbox"
"""The `Table.info` key that marks an outbox's tables; its value is the events table's name.
Alembic's autogenerate leaves the marked tables to `op.create_outbox` (see outbox.alembic)."""

# A key row's `available_at` for a key nobody has served since it got pending events: such
# keys take their turn before keys that were just served, and no relay's clock can find them
# "not yet due" (leases, retry times and turns are set with the relays' clocks).
NEVER_SERVED = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,47}$")


def _stable_int63(text: str) -> int:
    """A stable 63-bit number for `text` (Python's hash() changes between processes)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


class Outbox:
    """The outbox tables of one application: events, keys, failure history, live relays.

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
        self.keys = _keys_table(self.metadata, table, schema)
        self.failures = _failures_table(self.metadata, table, schema)
        self.relays = _relays_table(self.metadata, table, schema)
        # Writers take this (transaction-scoped) per key before numbering a row; relays take
        # it before removing a key's row, so the two never race (see outbox.ddl).
        self.key_lock_seed = _stable_int63(f"outbox-key:{self.qualified_name}")

    @property
    def tables(self) -> list[sa.Table]:
        return [self.events, self.keys, self.failures, self.relays]

    def create(self, bind: sa.Engine | Connection) -> SchemaReport:
        """Create what is missing (tables, indexes, triggers), or upgrade an outbox made by an
        older version in place; safe to run again. Returns what it changed.

        With an `AsyncEngine`: `await conn.run_sync(outbox.create)`.
        """
        from outbox.ddl import create

        if not isinstance(bind, sa.Engine | Connection):
            raise OutboxError(
                f"Outbox.create() takes a sync Engine or Connection, got {type(bind).__name__}: "
                "with an AsyncEngine use `async with engine.begin() as conn: "
                "await conn.run_sync(outbox.create)`"
            )
        if isinstance(bind, sa.Engine):
            with bind.begin() as connection:
                return create(self, connection)
        return create(self, bind)

    def drop(self, bind: sa.Engine | Connection) -> None:
        """Drop the outbox tables and sequence (tests and teardown only)."""
        if isinstance(bind, sa.Engine):
            with bind.begin() as connection:
                self.drop(connection)
            return
        self.metadata.drop_all(bind, tables=self.tables, checkfirst=True)

    def ddl_statements(self, dialect: Dialect | None = None) -> list[str]:
        """The DDL `create()` would run on an empty database, as SQL text, for teams that apply
        migrations themselves. It also upgrades an outbox of an older version in place."""
        from outbox.ddl import ddl_statements

        if dialect is None:
            from sqlalchemy.dialects import postgresql

            dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
        return ddl_statements(self, dialect)


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
        # Relay state of the event itself.
        sa.Column("status", sa.String(16), nullable=False, server_default=PENDING),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", ts),
        sa.Column("last_error", sa.Text()),
        sa.Column("published_at", ts),
        # Which relay published it (or holds it, for an event without a key).
        sa.Column("claimed_by", sa.Text()),
        # Only events without a key are leased row by row; a keyed event's lease is its key's.
        sa.Column("claim_token", sa.Uuid()),
        sa.Column("lease_until", ts),
        sa.CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + ")",
            name=f"{name}_status_valid",
        ),
        # Relays of schema 1 leased keyed rows one by one; this refuses them (see outbox.ddl).
        sa.CheckConstraint("key IS NULL OR claim_token IS NULL", name=f"{name}_lease_v2"),
        # A key's pending rows in write order: what a claim reads for each key it leases, and
        # (key IS NULL) the events without a key. The only index of pending rows: one ordered
        # by seq alone would tempt the planner to walk every pending row to find one key's.
        sa.Index(
            f"{name}_bykey_idx",
            "key",
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
        info={INFO_KEY: name},
        # Never reuse a purged rowid: write order must only grow.
        sqlite_autoincrement=True,
    )


def _keys_table(metadata: sa.MetaData, name: str, schema: str | None) -> sa.Table:
    ts = sa.DateTime(timezone=True)
    return sa.Table(
        f"{name}_key",
        metadata,
        sa.Column("key", sa.Text(), primary_key=True),
        # When a relay may next claim the key. Its meaning follows the key's state: new (no
        # relay served it since it got pending events), NEVER_SERVED; free, the moment it was
        # freed (oldest first: round-robin); leased, the lease's expiry; waiting for a retry,
        # the retry time. Claims take keys with `available_at <= now` in this order.
        sa.Column("available_at", ts, nullable=False),
        # A dead event holds the key's later events until it is requeued or purged.
        sa.Column("held", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("lease_token", sa.Uuid()),
        sa.Column("leased_by", sa.Text()),
        sa.Index(
            f"{name}_key_ready",
            "available_at",
            postgresql_where=sa.text("NOT held"),
            sqlite_where=sa.text("NOT held"),
        ),
        sa.Index(
            f"{name}_key_token",
            "lease_token",
            postgresql_where=sa.text("lease_token IS NOT NULL"),
            sqlite_where=sa.text("lease_token IS NOT NULL"),
        ),
        schema=schema,
        info={INFO_KEY: name},
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
        info={INFO_KEY: name},
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
        # The broker node (host:port) it is connected to; NULL while it is not.
        sa.Column("broker_node", sa.Text()),
        schema=schema,
        info={INFO_KEY: name},
    )
