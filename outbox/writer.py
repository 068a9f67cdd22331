"""`write()`: save events in the caller's transaction.

The writer never opens a connection and never commits: the events become visible to the relay
exactly when the caller's transaction commits, and vanish with it on rollback.

With OpenTelemetry in use, each event also stores the trace context current at `write()` in
its headers (`traceparent`, `tracestate`; see outbox/tracing.py). That is part of the same
row, so it changes nothing about the transaction: still one INSERT on the caller's connection.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from outbox.domain import as_event
from outbox.encoding import encode_headers, encode_json
from outbox.errors import ClosedBindError, InvalidEventError, UnsupportedBindError
from outbox.event import Event
from outbox.schema import Outbox
from outbox.tracing import current_trace_headers, merged_headers

if TYPE_CHECKING:
    # Imported lazily at run time: sqlalchemy.ext.asyncio needs greenlet (the `asyncio` extra).
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

DEFAULT_OUTBOX = Outbox()
"""The table named "outbox" in the default schema, on a MetaData of its own."""


def event_rows(
    events: Iterable[Event], *, trace: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Encode every event, or raise before anything reaches the database.

    `trace`: headers of the current trace context to add to every event that has none
    (`outbox.tracing.current_trace_headers()` unless given; aggregates pass `{}` because their
    events carry the context of their `record()` already).
    """
    if trace is None:
        trace = current_trace_headers()
    rows = []
    for event in events:
        event = as_event(event)  # a typed domain event (outbox.domain) becomes an Event
        if not isinstance(event, Event):
            raise InvalidEventError(
                f"write() takes outbox.Event objects, got {type(event).__name__}"
            )
        rows.append(
            {
                "id": event.id,
                "type": event.type,
                "key": event.key,
                "aggregate_type": event.aggregate_type,
                "aggregate_id": event.aggregate_id,
                "routing_key": event.routing_key,
                "correlation_id": event.correlation_id,
                "version": event.version,
                "payload": encode_json(event.payload, what=f"payload of {event.type} event"),
                "headers": encode_headers(merged_headers(event.headers, trace)),
                "occurred_at": event.occurred_at,
            }
        )
    return rows


def insert_rows(connection: Connection, outbox: Outbox, rows: list[dict[str, Any]]) -> None:
    """One INSERT statement for all rows (executemany is pipelined by psycopg)."""
    if rows:
        connection.execute(sa.insert(outbox.events), rows if len(rows) > 1 else rows[0])


def write(
    bind: Session | Connection, *events: Event, outbox: Outbox = DEFAULT_OUTBOX
) -> list[uuid.UUID]:
    """Save `events` in the transaction of `bind` (a Session or Connection); return their ids.

    Nothing is committed here: commit or roll back as you always do. For an `AsyncSession` or
    `AsyncConnection`, use `write_async()`.
    """
    if _is_async(bind):
        raise UnsupportedBindError(
            f"write() got an {type(bind).__name__}: use `await outbox.write_async(...)`"
        )
    rows = event_rows(events)
    connection = _connection_of(bind, outbox)
    insert_rows(connection, outbox, rows)
    return [row["id"] for row in rows]


async def write_async(
    bind: AsyncSession | AsyncConnection, *events: Event, outbox: Outbox = DEFAULT_OUTBOX
) -> list[uuid.UUID]:
    """`write()` for asyncio: saves `events` in the transaction of `bind`.

    Needs greenlet, as every SQLAlchemy asyncio program does: install `outbox-relay[asyncio]`.
    """
    if not _is_async(bind):
        raise UnsupportedBindError(
            f"write_async() takes an AsyncSession or AsyncConnection, got "
            f"{type(bind).__name__}: for a sync one use outbox.write(...)"
        )
    rows = event_rows(events)  # validate before the first await touches the database
    from sqlalchemy.ext.asyncio import AsyncConnection  # loaded: `bind` is one of its types

    if isinstance(bind, AsyncConnection) and bind.closed:
        raise ClosedBindError("write_async() got a closed AsyncConnection")

    def _write(sync_bind: Session | Connection) -> None:
        insert_rows(_connection_of(sync_bind, outbox), outbox, rows)

    await bind.run_sync(_write)
    return [row["id"] for row in rows]


def _is_async(bind: object) -> bool:
    # An AsyncSession or AsyncConnection exists only once its module was imported.
    asyncio = sys.modules.get("sqlalchemy.ext.asyncio")
    return asyncio is not None and isinstance(bind, asyncio.AsyncSession | asyncio.AsyncConnection)


def _connection_of(bind: Session | Connection, outbox: Outbox) -> Connection:
    if isinstance(bind, Connection):
        if bind.closed or bind.invalidated:
            raise ClosedBindError(
                "write() got a closed connection: pass the open connection whose transaction "
                "should hold the events"
            )
        return bind
    if isinstance(bind, Session):
        # The session's own connection for the outbox table, inside its current transaction
        # (begun here if the session had none, exactly as session.execute() would).
        return bind.connection(bind_arguments={"clause": outbox.events})
    raise UnsupportedBindError(
        f"write() takes a SQLAlchemy Session or Connection, got {type(bind).__name__}"
    )
