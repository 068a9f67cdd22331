"""A small consuming application for the consumer tests: events, handlers and their effects.

`build(schema)` gives a fresh one on a schema of its own. `handlers` (module level) is what
`outbox-relay consume tests.consumer.app:handlers` loads in subprocess tests: it reads its
schema and its fault switches from OUTBOX_TEST_* variables (test code, not library code).
"""

from __future__ import annotations

import dataclasses
import decimal
import os
import signal
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox.consumer import Handlers, Inbox, Message
from outbox.domain import DomainEvents


@dataclasses.dataclass
class Faults:
    """Switches the tests flip: failures per order id, and a hook run inside the handler."""

    fail_times: dict[str, int] = dataclasses.field(default_factory=dict)
    fail_file: str | None = None  # orders listed in this file (one per line) fail
    kill_after_commit: str | None = None  # "order_id:n": SIGKILL right after its commit
    inside_handler: Any = None  # callable(event) or None


@dataclasses.dataclass
class App:
    events: DomainEvents
    handlers: Handlers
    inbox: Inbox
    effects: sa.Table
    faults: Faults
    order_placed: type[Any]

    def create(self, engine: sa.Engine) -> None:
        self.inbox.create(engine)
        self.effects.metadata.create_all(engine, tables=[self.effects])

    def pids(self, engine: sa.Engine) -> set[int]:
        with engine.connect() as conn:
            return set(conn.execute(sa.select(self.effects.c.pid).distinct()).scalars())

    def applied(self, engine: sa.Engine) -> list[tuple[str, str, int]]:
        """(handler, order id, n) of every effect, in commit order."""
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    self.effects.c.handler, self.effects.c.order_id, self.effects.c.n
                ).order_by(self.effects.c.id)
            ).all()
        return [(r.handler, r.order_id, r.n) for r in rows]


def build(schema: str, name: str = "test", faults: Faults | None = None) -> App:
    faults = faults or Faults()
    events = DomainEvents()
    metadata = sa.MetaData(schema=schema)
    inbox = Inbox(metadata, schema=schema)
    effects = sa.Table(
        "effects",
        metadata,
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("handler", sa.String(50), nullable=False),
        sa.Column("order_id", sa.String(255), nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("total", sa.Numeric(12, 2), nullable=True),
        sa.Column("pid", sa.Integer, nullable=False, default=os.getpid),
    )

    @events.event("order.placed", version=3, key=lambda e: f"order:{e.order_id}")
    @dataclasses.dataclass(frozen=True)
    class OrderPlaced:
        order_id: str
        n: int
        total: decimal.Decimal
        currency: str

    @events.upcaster("order.placed", from_version=1)
    def v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
        payload["total"] = payload.pop("amount")
        return payload

    @events.upcaster("order.placed", from_version=2)
    def v2_to_v3(payload: dict[str, Any]) -> dict[str, Any]:
        return {"currency": "EUR", **payload}

    handlers = Handlers(name, events, inbox=inbox)

    def effect(session: Session, handler: str, order_id: str, n: int, total: Any = None) -> None:
        session.execute(
            sa.insert(effects).values(handler=handler, order_id=order_id, n=n, total=total)
        )

    @handlers.on(OrderPlaced)
    def book(event: OrderPlaced, session: Session) -> None:
        effect(session, "book", event.order_id, event.n, event.total)
        if faults.inside_handler is not None:
            faults.inside_handler(event)
        if faults.kill_after_commit == f"{event.order_id}:{event.n}":
            session.info["kill_after_commit"] = True
        failing = Path(faults.fail_file) if faults.fail_file else None
        if (
            failing is not None
            and failing.exists()
            and event.order_id in failing.read_text().split()
        ):
            raise RuntimeError(f"booking order {event.order_id} failed (test, file)")
        left = faults.fail_times.get(event.order_id, 0)
        if left:
            faults.fail_times[event.order_id] = left - 1
            raise RuntimeError(f"booking order {event.order_id} failed (test)")

    @handlers.on(OrderPlaced)
    def notify(event: OrderPlaced, session: Session) -> None:
        effect(session, "notify", event.order_id, event.n)

    @handlers.on("order.archived")
    def archive(message: Message, session: Session) -> None:
        payload = message.payload()
        effect(session, "archive", str(payload["order_id"]), int(payload["n"]))

    return App(events, handlers, inbox, effects, faults, OrderPlaced)


def _from_environment() -> Handlers:
    """For `outbox-relay consume tests.consumer.app:handlers` in subprocess tests."""
    faults = Faults()
    fail = os.environ.get("OUTBOX_TEST_FAIL")  # "order_id:times,..."
    if fail:
        for item in fail.split(","):
            order_id, _, times = item.partition(":")
            faults.fail_times[order_id] = int(times)
    faults.fail_file = os.environ.get("OUTBOX_TEST_FAIL_FILE")
    kill_on = os.environ.get("OUTBOX_TEST_KILL_IN_HANDLER")  # order_id:n -> SIGKILL self
    hold = os.environ.get("OUTBOX_TEST_HOLD_FILE")  # handler waits while this file exists
    marker = os.environ.get("OUTBOX_TEST_MARKER_DIR")  # handler touches <dir>/<order>-<n>

    def inside(event: Any) -> None:
        if marker:
            Path(marker, f"{event.order_id}-{event.n}").touch()
        if kill_on and f"{event.order_id}:{event.n}" == kill_on:
            os.kill(os.getpid(), signal.SIGKILL)
        while hold and Path(hold).exists():
            time.sleep(0.01)

    faults.inside_handler = inside
    faults.kill_after_commit = os.environ.get("OUTBOX_TEST_KILL_AFTER_COMMIT")
    if faults.kill_after_commit:

        @sa.event.listens_for(Session, "after_commit")
        def die(session: Session) -> None:
            # Committed, and the ack not sent yet: the consumer acks after process() returns.
            if session.info.get("kill_after_commit"):
                os.kill(os.getpid(), signal.SIGKILL)

    group = os.environ.get("OUTBOX_TEST_GROUP", "test")
    return build(os.environ["OUTBOX_TEST_SCHEMA"], name=group, faults=faults).handlers


def handlers() -> Handlers:
    return _from_environment()
