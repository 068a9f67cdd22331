"""Testing helpers for applications: what did a use case record, and what do handlers do with it.

    def test_placing_an_order(engine, record_outbox_events):
        recorder = record_outbox_events(engine, outbox=events_outbox, events=domain_events)
        place_order(...)                                  # commits as in production
        assert recorder.of(OrderPlaced) == [OrderPlaced(order_id=1, total=Decimal("9.99"))]
        deliver(handlers, Session, *recorder.recorded)    # the handlers, synchronously

`EventRecorder` listens to an engine and keeps the events that committed transactions wrote to
an outbox table (rolled-back ones are dropped, as in production). `deliver()` runs handlers
through the real inbox processor, with no broker, and raises when a handler fails instead of
parking the key. The pytest fixture `record_outbox_events` comes with
`pytest_plugins = ["outbox.consumer.pytest_plugin"]` in your conftest.py.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from outbox.consumer.errors import ConsumerError
from outbox.consumer.handlers import Handlers
from outbox.consumer.message import ORDERING_KEY_HEADER, SEQ_HEADER, VERSION_HEADER, Message
from outbox.consumer.processor import Outcome, Processor, Result, RetryPolicy
from outbox.domain import DomainEvents, as_event, spec_of
from outbox.encoding import encode_json
from outbox.event import Event
from outbox.schema import Outbox
from outbox.writer import DEFAULT_OUTBOX

T = TypeVar("T")


class HandlerFailedError(ConsumerError):
    """`deliver()` met a handler that raised or a payload that did not decode."""


@dataclasses.dataclass(frozen=True)
class RecordedEvent:
    """One event as a committed transaction wrote it to the outbox."""

    id: uuid.UUID
    type: str
    version: int
    key: str | None
    payload: Any
    headers: dict[str, str]
    seq: int

    def message(self) -> Message:
        """The message the relay would publish for it."""
        headers: dict[str, Any] = {
            **self.headers,
            VERSION_HEADER: self.version,
            SEQ_HEADER: self.seq,
        }
        if self.key is not None:
            headers[ORDERING_KEY_HEADER] = self.key
        return Message(
            message_id=str(self.id),
            type=self.type,
            version=self.version,
            key=self.key,
            seq=self.seq,
            body=encode_json(self.payload, what="recorded payload").encode(),
            headers=headers,
            routing_key=self.type,
        )


class EventRecorder:
    """Keeps the events committed to `outbox` through `engine` (a context manager)."""

    def __init__(
        self,
        engine: sa.Engine,
        outbox: Outbox = DEFAULT_OUTBOX,
        events: DomainEvents | None = None,
    ) -> None:
        self.engine = engine
        self.outbox = outbox
        self.events = events
        self.recorded: list[RecordedEvent] = []
        self._pending: dict[int, list[RecordedEvent]] = {}
        self._seq = 0
        self._listening = False

    def start(self) -> EventRecorder:
        if not self._listening:
            sa.event.listen(self.engine, "after_execute", self._after_execute)
            sa.event.listen(self.engine, "commit", self._commit)
            sa.event.listen(self.engine, "rollback", self._rollback)
            self._listening = True
        return self

    def stop(self) -> None:
        if self._listening:
            sa.event.remove(self.engine, "after_execute", self._after_execute)
            sa.event.remove(self.engine, "commit", self._commit)
            sa.event.remove(self.engine, "rollback", self._rollback)
            self._listening = False

    def __enter__(self) -> EventRecorder:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def clear(self) -> None:
        self.recorded.clear()

    def types(self) -> list[str]:
        return [e.type for e in self.recorded]

    def of(self, cls: type[T]) -> list[T]:
        """The recorded events of a domain event class, decoded (through upcasters)."""
        spec = spec_of(cls)
        if spec is None or self.events is None:
            raise ConsumerError(
                f"{getattr(cls, '__name__', cls)} needs the DomainEvents it is registered in: "
                "EventRecorder(engine, outbox, events=...)"
            )
        return [
            self.events.decode(e.type, e.version, e.payload)
            for e in self.recorded
            if e.type == spec.type
        ]

    # -- engine events ---------------------------------------------------------------------

    def _after_execute(
        self,
        conn: Connection,
        clause: Any,
        multiparams: Any,
        params: Any,
        execution_options: Any,
        result: Any,
    ) -> None:
        if not isinstance(clause, sa.Insert) or clause.table is not self.outbox.events:
            return
        rows = multiparams if isinstance(multiparams, list) else [multiparams]
        if rows and isinstance(rows[0], list):
            rows = rows[0]
        pending = self._pending.setdefault(id(conn), [])
        for row in rows or [params]:
            if not isinstance(row, dict):
                continue
            self._seq += 1
            pending.append(
                RecordedEvent(
                    id=row["id"],
                    type=row["type"],
                    version=row["version"],
                    key=row.get("key"),
                    payload=json.loads(row["payload"]),
                    headers=json.loads(row["headers"]) if row.get("headers") else {},
                    seq=self._seq,
                )
            )

    def _commit(self, conn: Connection) -> None:
        self.recorded.extend(self._pending.pop(id(conn), []))

    def _rollback(self, conn: Connection) -> None:
        self._pending.pop(id(conn), None)


def as_message(item: Any, seq: int) -> Message:
    if isinstance(item, Message):
        return item
    if isinstance(item, RecordedEvent):
        return item.message()
    event = as_event(item)
    if not isinstance(event, Event):
        raise ConsumerError(
            f"deliver() takes domain events, Events, RecordedEvents or Messages, got "
            f"{type(item).__name__}"
        )
    return RecordedEvent(
        id=event.id,
        type=event.type,
        version=event.version,
        key=event.key,
        payload=json.loads(encode_json(event.payload, what=f"payload of {event.type}")),
        headers=dict(event.headers),
        seq=seq,
    ).message()


def deliver(
    handlers: Handlers,
    sessions: Callable[[], Session],
    *items: Any,
    raise_errors: bool = True,
) -> list[Result]:
    """Run `handlers` on each item in order, through the inbox, synchronously (no broker).

    The inbox tables must exist in the sessions' database (`handlers.inbox.create(engine)`).
    With `raise_errors`, a failing handler or an undecodable payload raises
    HandlerFailedError (with the handler's traceback) instead of parking the key.
    """
    processor = Processor(handlers, sessions, policy=RetryPolicy(max_attempts=1), sleep=_no_sleep)
    results = []
    for seq, item in enumerate(items, start=1):
        result = processor.process(as_message(item, seq))
        if raise_errors and result.outcome is Outcome.PARKED and result.reason != "behind":
            raise HandlerFailedError(f"{result.reason}: {result.error}")
        results.append(result)
    return results


def _no_sleep(seconds: float) -> None:
    return None
