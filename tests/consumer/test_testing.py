"""The testing helpers applications use: record what a use case wrote, deliver it to handlers."""

from __future__ import annotations

import dataclasses
import decimal
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import outbox
from outbox import AggregateRoot, Outbox
from outbox.consumer import Handlers, Inbox, Outcome
from outbox.consumer.pytest_plugin import record_outbox_events  # noqa: F401 - the fixture
from outbox.consumer.testing import EventRecorder, HandlerFailedError, deliver
from outbox.domain import DomainEvents

events = DomainEvents()


@events.event("cart.checked_out", version=2)
@dataclasses.dataclass(frozen=True)
class CheckedOut:
    cart_id: int
    total: decimal.Decimal


@events.upcaster("cart.checked_out", from_version=1)
def _v1(payload: dict[str, object]) -> dict[str, object]:
    return {"cart_id": payload["cart_id"], "total": payload["amount"]}


class Base(DeclarativeBase):
    pass


class Cart(Base, AggregateRoot):
    __tablename__ = "carts"
    id: Mapped[int] = mapped_column(primary_key=True)
    total: Mapped[str] = mapped_column(default="0")

    def check_out(self, total: str) -> None:
        self.total = total
        self.record(CheckedOut(cart_id=self.id, total=decimal.Decimal(total)))  # type: ignore[arg-type]


class Receipt(Base):
    __tablename__ = "receipts"
    cart_id: Mapped[int] = mapped_column(primary_key=True)
    total: Mapped[str]


box = Outbox(Base.metadata)
inbox = Inbox(Base.metadata)
handlers = Handlers("receipts", events, inbox=inbox)
failures: list[int] = []


@handlers.on(CheckedOut)
def write_receipt(event: CheckedOut, session: Session) -> None:
    if event.cart_id in failures:
        raise ValueError(f"cart {event.cart_id} cannot be receipted")
    session.add(Receipt(cart_id=event.cart_id, total=str(event.total)))


@pytest.fixture
def engine(sqlite_url: str) -> sa.Engine:
    engine = sa.create_engine(sqlite_url)
    Base.metadata.create_all(engine)
    return engine


def test_a_use_case_records_events_and_handlers_run_on_them(
    engine: sa.Engine,
    record_outbox_events: Callable[..., EventRecorder],  # noqa: F811 - the imported fixture
) -> None:
    recorder = record_outbox_events(engine, outbox=box, events=events)
    sessions = sessionmaker(engine)
    outbox.install(sessions, outbox=box)
    with sessions() as session, session.begin():
        cart = Cart(id=1)
        session.add(cart)
        session.flush()
        cart.check_out("12.50")
    with sessions() as session, session.begin():
        cart = Cart(id=2)
        session.add(cart)
        session.flush()
        cart.check_out("1.00")
        session.rollback()  # never committed: never recorded
    assert recorder.types() == ["cart.checked_out"]
    assert recorder.of(CheckedOut) == [CheckedOut(cart_id=1, total=decimal.Decimal("12.50"))]

    results = deliver(handlers, sessions, *recorder.recorded)
    assert [r.outcome for r in results] == [Outcome.HANDLED]
    assert [r.outcome for r in deliver(handlers, sessions, *recorder.recorded)] == [
        Outcome.DUPLICATE
    ]
    with sessions() as session:
        assert session.scalars(sa.select(Receipt.total)).all() == ["12.50"]


def test_deliver_takes_domain_events_and_raises_when_a_handler_fails(engine: sa.Engine) -> None:
    sessions = sessionmaker(engine)
    failures.append(7)
    try:
        with pytest.raises(HandlerFailedError, match="cart 7 cannot be receipted"):
            deliver(handlers, sessions, CheckedOut(cart_id=7, total=decimal.Decimal("1")))
    finally:
        failures.remove(7)
    [result] = deliver(handlers, sessions, CheckedOut(cart_id=8, total=decimal.Decimal("2")))
    assert result.outcome is Outcome.HANDLED
