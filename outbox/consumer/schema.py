"""The inbox tables, on the application's MetaData, and every statement the consumer runs.

* `inbox`: one row per (consumer, message_id) applied. Inserted first in the handler's own
  transaction, so the handler's effects and the row commit together or not at all.
* `inbox_keys`: per (consumer, ordering key) the last `outbox-seq` applied, and whether the key
  is parked. Its row is locked while a message of the key is processed, which serialises one
  key's messages even when two consumers hold them (a key that moved queues).
* `inbox_parked`: messages set aside, in arrival order (`id`), with their error. A key with
  `parked` set sends every later message here until an operator retries or skips it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from outbox.consumer.message import Message

MAX_NAME = 100
MAX_SHORT = 255
# Reasons a message is parked. All but STALE hold back the later messages of their key.
REASON_FAILED = "failed"
REASON_UNDECODABLE = "undecodable"
REASON_BEHIND = "behind"
REASON_STALE = "stale"
BLOCKING_REASONS = (REASON_FAILED, REASON_UNDECODABLE, REASON_BEHIND)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Inbox:
    """The consumer tables, named `{prefix}`, `{prefix}_keys` and `{prefix}_parked`."""

    def __init__(
        self,
        metadata: sa.MetaData | None = None,
        *,
        schema: str | None = None,
        prefix: str = "inbox",
    ) -> None:
        self.metadata = metadata if metadata is not None else sa.MetaData()
        self.schema = schema
        ident = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
        self.messages = sa.Table(
            prefix,
            self.metadata,
            sa.Column("consumer", sa.String(MAX_NAME), primary_key=True),
            sa.Column("message_id", sa.String(MAX_SHORT), primary_key=True),
            sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
            # Retention cleanup walks this index in small batches.
            sa.Index(f"{prefix}_received_idx", "consumer", "received_at"),
            schema=schema,
        )
        self.keys = sa.Table(
            f"{prefix}_keys",
            self.metadata,
            sa.Column("consumer", sa.String(MAX_NAME), primary_key=True),
            sa.Column("key", sa.String(MAX_SHORT), primary_key=True),
            sa.Column("last_seq", sa.BigInteger, nullable=True),
            # last_seq before the current transaction's upsert (see lock_key).
            sa.Column("previous_seq", sa.BigInteger, nullable=True),
            sa.Column("parked", sa.Boolean, nullable=False, default=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            schema=schema,
        )
        self.parked = sa.Table(
            f"{prefix}_parked",
            self.metadata,
            sa.Column("id", ident, sa.Identity(), primary_key=True),
            sa.Column("consumer", sa.String(MAX_NAME), nullable=False),
            sa.Column("message_id", sa.String(MAX_SHORT), nullable=False),
            sa.Column("key", sa.String(MAX_SHORT), nullable=True),
            sa.Column("seq", sa.BigInteger, nullable=True),
            sa.Column("type", sa.String(MAX_SHORT), nullable=False),
            sa.Column("version", sa.Integer, nullable=False),
            sa.Column("routing_key", sa.String(MAX_SHORT), nullable=True),
            sa.Column("headers", sa.Text, nullable=False),
            sa.Column("body", sa.LargeBinary, nullable=False),
            sa.Column("reason", sa.String(20), nullable=False),
            sa.Column("error", sa.Text, nullable=True),
            sa.Column("attempts", sa.Integer, nullable=False, default=0),
            sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("retry_requested", sa.Boolean, nullable=False, default=False),
            # A redelivered message is parked once.
            sa.UniqueConstraint("consumer", "message_id", name=f"{prefix}_parked_message_uq"),
            sa.Index(f"{prefix}_parked_key_idx", "consumer", "key", "id"),
            schema=schema,
        )

    @property
    def tables(self) -> list[sa.Table]:
        return [self.messages, self.keys, self.parked]

    def create(self, bind: sa.Engine | Connection) -> None:
        """Create the tables that are missing (and the schema, on PostgreSQL); idempotent."""
        if isinstance(bind, sa.Engine):
            with bind.begin() as connection:
                self.create(connection)
            return
        if self.schema and bind.dialect.name == "postgresql":
            bind.execute(sa.schema.CreateSchema(self.schema, if_not_exists=True))
        self.metadata.create_all(bind, tables=self.tables)

    def drop(self, bind: sa.Engine) -> None:
        self.metadata.drop_all(bind, tables=self.tables)


@dataclasses.dataclass(frozen=True)
class KeyState:
    last_seq: int | None
    parked: bool


@dataclasses.dataclass(frozen=True)
class ParkedMessage:
    """One parked row: the message as it arrived, why it is parked, and its last error."""

    id: int
    consumer: str
    message: Message
    reason: str
    error: str | None
    attempts: int
    parked_at: dt.datetime
    retry_requested: bool

    @classmethod
    def from_row(cls, row: Any) -> ParkedMessage:
        return cls(
            id=row.id,
            consumer=row.consumer,
            message=Message(
                message_id=row.message_id,
                type=row.type,
                version=row.version,
                key=row.key,
                seq=row.seq,
                body=bytes(row.body),
                headers=json.loads(row.headers),
                routing_key=row.routing_key,
            ),
            reason=row.reason,
            error=row.error,
            attempts=row.attempts,
            parked_at=row.parked_at,
            retry_requested=row.retry_requested,
        )


def _insert_ignore(connection: Connection, table: sa.Table, values: Mapping[str, Any]) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING; True if the row was inserted."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(table)
        .values(**values)
        .on_conflict_do_nothing()
        .returning(sa.literal_column("1"))
    )
    return connection.execute(statement).first() is not None


class InboxStatements:
    """Every statement on the inbox tables, for one consumer group."""

    def __init__(self, inbox: Inbox, consumer: str) -> None:
        self.inbox = inbox
        self.consumer = consumer
        self._statements: dict[tuple[str, str], Any] = {}

    # -- the message path ----------------------------------------------------------------------

    def _cached(self, connection: Connection, name: str, build: Callable[[Any], Any]) -> Any:
        """Statements built once per dialect (building one costs more than running it)."""
        dialect = connection.dialect.name
        statement = self._statements.get((dialect, name))
        if statement is None:
            insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
            statement = self._statements[dialect, name] = build(insert)
        return statement

    def claim(self, connection: Connection, message_id: str) -> bool:
        """Insert the inbox row; False if it exists (a duplicate). Waits for a concurrent
        transaction that inserted the same row, then sees its outcome."""
        m = self.inbox.messages

        def build(insert: Any) -> Any:
            return (
                insert(m)
                .values(
                    consumer=sa.bindparam("consumer"),
                    message_id=sa.bindparam("message_id"),
                    received_at=sa.bindparam("received_at"),
                )
                .on_conflict_do_nothing()
                .returning(sa.literal_column("1"))
            )

        statement = self._cached(connection, "claim", build)
        parameters = {"consumer": self.consumer, "message_id": message_id, "received_at": _utcnow()}
        return connection.execute(statement, parameters).first() is not None

    def unclaim(self, connection: Connection, message_id: str) -> None:
        m = self.inbox.messages
        connection.execute(
            sa.delete(m).where(m.c.consumer == self.consumer, m.c.message_id == message_id)
        )

    def lock_key(
        self, connection: Connection, key: str, *, advance_to: int | None = None
    ) -> KeyState:
        """Create the key's row if needed and lock it until the transaction ends.

        One statement: an upsert locks the row it updates, waits for a transaction that holds
        it, and returns the row as that transaction committed it. With `advance_to`, it also
        raises the key's last applied seq to that (unless the key is parked), saving a
        statement on the common path; a rollback undoes it with the handlers' work. The
        state returned is always the one from before: `previous_seq` keeps the old value
        because RETURNING only sees the new row.
        """
        k = self.inbox.keys
        sqlite_dialect = connection.dialect.name == "sqlite"

        def build(insert: Any) -> Any:
            statement = insert(k).values(
                consumer=sa.bindparam("consumer"),
                key=sa.bindparam("key"),
                parked=False,
                updated_at=sa.bindparam("updated_at"),
                last_seq=sa.bindparam("seq", type_=sa.BigInteger),
                previous_seq=None,
            )
            changes: dict[str, Any] = {
                "updated_at": statement.excluded.updated_at,
                "previous_seq": k.c.last_seq,
            }
            if advance_to is not None:
                larger = sa.func.max if sqlite_dialect else sa.func.greatest
                changes["last_seq"] = sa.case(
                    (k.c.parked.is_(True), k.c.last_seq),
                    else_=larger(sa.func.coalesce(k.c.last_seq, 0), statement.excluded.last_seq),
                )
            return statement.on_conflict_do_update(
                index_elements=[k.c.consumer, k.c.key], set_=changes
            ).returning(k.c.previous_seq, k.c.parked)

        name = "lock_key" if advance_to is None else "lock_key_advance"
        statement = self._cached(connection, name, build)
        parameters = {
            "consumer": self.consumer,
            "key": key,
            "updated_at": _utcnow(),
            "seq": advance_to,
        }
        row = connection.execute(statement, parameters).one()
        return KeyState(last_seq=row.previous_seq, parked=bool(row.parked))

    def set_key(
        self, connection: Connection, key: str, *, last_seq: int | None = None, parked: bool
    ) -> None:
        """Set the key's parked flag and, if given, raise its last applied seq to `last_seq`."""
        k = self.inbox.keys
        sqlite_dialect = connection.dialect.name == "sqlite"

        def build(insert: Any) -> Any:
            values: dict[str, Any] = {
                "parked": sa.bindparam("parked"),
                "updated_at": sa.bindparam("updated_at"),
            }
            if last_seq is not None:
                larger = sa.func.max if sqlite_dialect else sa.func.greatest
                values["last_seq"] = larger(
                    sa.func.coalesce(k.c.last_seq, 0), sa.bindparam("seq", type_=sa.BigInteger)
                )
            return (
                sa.update(k)
                .where(k.c.consumer == sa.bindparam("c"), k.c.key == sa.bindparam("k"))
                .values(**values)
            )

        name = "set_key" if last_seq is None else "set_key_seq"
        statement = self._cached(connection, name, build)
        parameters: dict[str, Any] = {
            "c": self.consumer,
            "k": key,
            "parked": parked,
            "updated_at": _utcnow(),
        }
        if last_seq is not None:
            parameters["seq"] = last_seq
        connection.execute(statement, parameters)

    def park(
        self,
        connection: Connection,
        message: Message,
        *,
        reason: str,
        error: str | None,
        attempts: int,
    ) -> bool:
        """Store the message in the parked table (once per message_id); True if stored now."""
        return _insert_ignore(
            connection,
            self.inbox.parked,
            {
                "consumer": self.consumer,
                # Without an id (not published by the relay) it still needs a row of its own.
                "message_id": message.message_id or f"(none):{uuid.uuid4()}",
                "key": message.key,
                "seq": message.seq,
                "type": message.type,
                "version": message.version,
                "routing_key": message.routing_key,
                "headers": json.dumps(dict(message.headers), default=str),
                "body": message.body,
                "reason": reason,
                "error": error,
                "attempts": attempts,
                "parked_at": _utcnow(),
                "retry_requested": False,
            },
        )

    # -- parked messages ---------------------------------------------------------------------

    def _parked_select(self) -> sa.Select[Any]:
        p = self.inbox.parked
        return sa.select(p).where(p.c.consumer == self.consumer)

    def parked_head(self, connection: Connection, key: str) -> ParkedMessage | None:
        """The first blocking parked message of `key`, the one that holds the key back."""
        p = self.inbox.parked
        row = connection.execute(
            self._parked_select()
            .where(p.c.key == key, p.c.reason.in_(BLOCKING_REASONS))
            .order_by(p.c.id)
            .limit(1)
        ).first()
        return None if row is None else ParkedMessage.from_row(row)

    def parked_by_id(self, connection: Connection, parked_id: int) -> ParkedMessage | None:
        p = self.inbox.parked
        row = connection.execute(self._parked_select().where(p.c.id == parked_id)).first()
        return None if row is None else ParkedMessage.from_row(row)

    def parked(
        self, connection: Connection, *, key: str | None = None, limit: int = 100
    ) -> list[ParkedMessage]:
        p = self.inbox.parked
        query = self._parked_select().order_by(p.c.id).limit(limit)
        if key is not None:
            query = query.where(p.c.key == key)
        return [ParkedMessage.from_row(row) for row in connection.execute(query)]

    def count_parked(self, connection: Connection) -> tuple[int, int]:
        """(parked messages, parked keys) of this consumer."""
        p, k = self.inbox.parked, self.inbox.keys
        messages = connection.execute(
            sa.select(sa.func.count()).select_from(p).where(p.c.consumer == self.consumer)
        ).scalar_one()
        keys = connection.execute(
            sa.select(sa.func.count())
            .select_from(k)
            .where(k.c.consumer == self.consumer, k.c.parked.is_(True))
        ).scalar_one()
        return int(messages), int(keys)

    def delete_parked(self, connection: Connection, parked_id: int) -> None:
        p = self.inbox.parked
        connection.execute(sa.delete(p).where(p.c.consumer == self.consumer, p.c.id == parked_id))

    def note_failure(
        self, connection: Connection, parked_id: int, *, error: str, attempts: int, reason: str
    ) -> None:
        p = self.inbox.parked
        connection.execute(
            sa.update(p)
            .where(p.c.consumer == self.consumer, p.c.id == parked_id)
            .values(
                error=error,
                attempts=p.c.attempts + attempts,
                reason=reason,
                retry_requested=False,
            )
        )

    def request_retry(
        self, connection: Connection, *, key: str | None = None, ids: Sequence[int] = ()
    ) -> int:
        """Mark parked messages for the running consumers to replay; returns how many.

        For a key: the messages that hold it back (a stale one is retried only by its id).
        """
        p = self.inbox.parked
        query = sa.update(p).where(p.c.consumer == self.consumer).values(retry_requested=True)
        if key is not None:
            query = query.where(p.c.key == key, p.c.reason.in_(BLOCKING_REASONS))
        if ids:
            query = query.where(p.c.id.in_(list(ids)))
        return int(connection.execute(query).rowcount)

    def clear_retry_requests(self, connection: Connection, key: str) -> None:
        p = self.inbox.parked
        connection.execute(
            sa.update(p)
            .where(p.c.consumer == self.consumer, p.c.key == key)
            .values(retry_requested=False)
        )

    def retry_requested(self, connection: Connection, limit: int) -> list[ParkedMessage]:
        p = self.inbox.parked
        rows = connection.execute(
            self._parked_select().where(p.c.retry_requested.is_(True)).order_by(p.c.id).limit(limit)
        )
        return [ParkedMessage.from_row(row) for row in rows]

    def has_blocking(self, connection: Connection, key: str) -> bool:
        return self.parked_head(connection, key) is not None

    # -- retention ---------------------------------------------------------------------------

    def delete_old(self, connection: Connection, cutoff: dt.datetime, batch: int) -> int:
        """Delete at most `batch` inbox rows received before `cutoff`, by the index.

        The ids are read first, then deleted by value: `DELETE ... IN (SELECT ... LIMIT n)`
        may run its subquery more than once and delete more than n rows (seen here: 1,689
        rows for a LIMIT of 1,000).
        """
        m = self.inbox.messages
        oldest = (
            sa.select(m.c.message_id)
            .where(m.c.consumer == self.consumer, m.c.received_at < cutoff)
            .order_by(m.c.received_at)
            .limit(batch)
        )
        if connection.dialect.name == "postgresql":
            oldest = oldest.with_for_update(skip_locked=True)
        ids = list(connection.execute(oldest).scalars())
        if not ids:
            return 0
        connection.execute(
            sa.delete(m).where(m.c.consumer == self.consumer, m.c.message_id.in_(ids))
        )
        return len(ids)

    def delete_old_keys(self, connection: Connection, cutoff: dt.datetime, batch: int) -> int:
        """Forget keys not seen since `cutoff` (never a parked one), at most `batch`."""
        k = self.inbox.keys
        oldest = (
            sa.select(k.c.key)
            .where(k.c.consumer == self.consumer, k.c.updated_at < cutoff, k.c.parked.is_(False))
            .limit(batch)
        )
        if connection.dialect.name == "postgresql":
            oldest = oldest.with_for_update(skip_locked=True)
        keys = list(connection.execute(oldest).scalars())
        if not keys:
            return 0
        connection.execute(sa.delete(k).where(k.c.consumer == self.consumer, k.c.key.in_(keys)))
        return len(keys)
