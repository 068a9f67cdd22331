"""Typed domain events: registration, the writer and aggregate hooks, decoding and upcasting."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import outbox
from outbox import AggregateRoot, Event, InvalidEventError, Outbox
from outbox.domain import (
    DomainEventError,
    DomainEvents,
    PayloadDecodeError,
    UnknownEventTypeError,
    UnknownEventVersionError,
    as_event,
)
from outbox.encoding import encode_json


class Status(enum.Enum):
    NEW = "new"
    PAID = "paid"


@dataclasses.dataclass(frozen=True)
class Line:
    sku: str
    quantity: int


def make_registry() -> tuple[DomainEvents, type[Any]]:
    events = DomainEvents()

    @events.event("order.placed", version=3, key=lambda e: f"order:{e.order_id}")
    @dataclasses.dataclass(frozen=True)
    class OrderPlaced:
        order_id: int
        total: decimal.Decimal
        currency: str
        placed_at: dt.datetime
        lines: tuple[Line, ...] = ()
        status: Status = Status.NEW
        coupon: uuid.UUID | None = None

    @events.upcaster("order.placed", from_version=1)
    def v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
        payload["total"] = payload.pop("amount")
        return payload

    @events.upcaster("order.placed", from_version=2)
    def v2_to_v3(payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "currency": payload.get("currency", "EUR")}

    return events, OrderPlaced


WHEN = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def test_an_instance_becomes_an_event_and_round_trips_through_json() -> None:
    events, OrderPlaced = make_registry()
    placed = OrderPlaced(
        order_id=7,
        total=decimal.Decimal("9.99"),
        currency="EUR",
        placed_at=WHEN,
        lines=(Line("a", 2),),
        status=Status.PAID,
        coupon=uuid.UUID(int=5),
    )
    event = as_event(placed)
    assert (event.type, event.version, event.key) == ("order.placed", 3, "order:7")
    wire = json.loads(encode_json(event.payload, what="test"))
    assert events.decode("order.placed", 3, wire) == placed


def test_v1_payload_is_upcast_through_v2_to_v3() -> None:
    events, OrderPlaced = make_registry()
    v1 = {"order_id": 1, "amount": "5.00", "placed_at": WHEN.isoformat()}
    decoded = events.decode("order.placed", 1, v1)
    assert decoded == OrderPlaced(
        order_id=1, total=decimal.Decimal("5.00"), currency="EUR", placed_at=WHEN
    )


def test_a_newer_version_than_the_class_says_what_to_deploy() -> None:
    events, _ = make_registry()
    with pytest.raises(UnknownEventVersionError, match="version 4 is newer.*deploy"):
        events.decode("order.placed", 4, {})


def test_a_missing_upcaster_names_the_decorator_to_add() -> None:
    events = DomainEvents()

    @events.event("thing.done", version=3)
    @dataclasses.dataclass(frozen=True)
    class Done:
        x: int

    @events.upcaster("thing.done", from_version=2)
    def up(p: dict[str, Any]) -> dict[str, Any]:
        return p

    assert events.decode("thing.done", 2, {"x": 1}) == Done(1)
    with pytest.raises(UnknownEventVersionError, match=r"upcaster\('thing.done', from_version=1\)"):
        events.decode("thing.done", 1, {"x": 1})


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([1, 2], "not an object"),
        ({"order_id": 1, "total": "1", "placed_at": WHEN.isoformat()}, "no 'currency'"),
        (
            {"order_id": "x", "total": "1", "currency": "E", "placed_at": WHEN.isoformat()},
            "integer",
        ),
        (
            {"order_id": 1, "total": "abc", "currency": "E", "placed_at": WHEN.isoformat()},
            "decimal",
        ),
        ({"order_id": 1, "total": "1", "currency": "E", "placed_at": "2026-01-01T00:00"}, "offset"),
        (
            {
                "order_id": 1,
                "total": "1",
                "currency": "E",
                "placed_at": WHEN.isoformat(),
                "status": "lost",
            },
            "Status",
        ),
        (
            {
                "order_id": 1,
                "total": "1",
                "currency": "E",
                "placed_at": WHEN.isoformat(),
                "lines": [{"sku": "a"}],
            },
            r"lines\[0\]: payload has no 'quantity'",
        ),
    ],
)
def test_payloads_that_do_not_fit_say_which_field(payload: Any, message: str) -> None:
    events, _ = make_registry()
    with pytest.raises(PayloadDecodeError, match=message):
        events.decode("order.placed", 3, payload)


def test_unknown_type_and_extra_fields() -> None:
    events, _ = make_registry()
    with pytest.raises(UnknownEventTypeError, match="no class is registered"):
        events.decode("order.lost", 1, {})
    payload = {"order_id": 1, "total": "1", "currency": "E", "placed_at": WHEN.isoformat()}
    # A tolerant reader: a field the class does not declare is ignored.
    assert events.decode("order.placed", 3, {**payload, "new_field": 1}).order_id == 1


def test_registration_errors() -> None:
    events = DomainEvents()
    with pytest.raises(DomainEventError, match="frozen"):

        @events.event("a.b")
        @dataclasses.dataclass
        class Mutable:
            x: int

    with pytest.raises(DomainEventError, match="dataclass"):

        @events.event("a.b")
        class Plain:
            pass

    @events.event("a.b")
    @dataclasses.dataclass(frozen=True)
    class First:
        x: int

    with pytest.raises(DomainEventError, match="already First"):

        @events.event("a.b")
        @dataclasses.dataclass(frozen=True)
        class Second:
            x: int

    with pytest.raises(InvalidEventError):
        events.event("has space")
    with pytest.raises(InvalidEventError):
        events.event("ok", version=0)


def test_two_registries_are_independent() -> None:
    one, _ = make_registry()
    two, _ = make_registry()
    assert one.spec("order.placed") is not two.spec("order.placed")


def test_an_unregistered_dataclass_is_refused_by_write() -> None:
    @dataclasses.dataclass(frozen=True)
    class Loose:
        x: int

    engine = sa.create_engine("sqlite://")
    box = Outbox()
    box.create(engine)
    with Session(engine) as session, pytest.raises(InvalidEventError, match="not a registered"):
        outbox.write(session, Loose(1), outbox=box)  # type: ignore[arg-type]


class Base(DeclarativeBase):
    pass


class Order(Base, AggregateRoot):
    __tablename__ = "orders"
    __aggregate_type__ = "order"
    id: Mapped[int] = mapped_column(primary_key=True)


def test_write_and_record_store_type_version_and_payload(
    pg_engine: sa.Engine, schema_name: str
) -> None:
    events = DomainEvents()

    @events.event("order.noted", version=2)
    @dataclasses.dataclass(frozen=True)
    class Noted:
        text: str
        amount: decimal.Decimal

    box = Outbox(Base.metadata, schema=schema_name)
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema_name}"')
        Order.__table__.schema = schema_name  # type: ignore[attr-defined]
    try:
        Base.metadata.create_all(pg_engine)
        box.create(pg_engine)
        with Session(pg_engine) as session, session.begin():
            outbox.install(session, outbox=box)
            outbox.write(session, Noted("direct", decimal.Decimal("1.5")), outbox=box)  # type: ignore[arg-type]
            order = Order()
            session.add(order)
            order.record(Noted("recorded", decimal.Decimal("2")))  # type: ignore[arg-type]
            session.flush()
            order_id = order.id
        with pg_engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    box.events.c.type, box.events.c.version, box.events.c.key, box.events.c.payload
                ).order_by(box.events.c.seq)
            ).all()
    finally:
        Order.__table__.schema = None  # type: ignore[attr-defined]
    assert [(r.type, r.version) for r in rows] == [("order.noted", 2)] * 2
    assert rows[0].key is None
    assert rows[1].key == f"order:{order_id}"
    assert [events.decode(r.type, r.version, json.loads(r.payload)) for r in rows] == [
        Noted("direct", decimal.Decimal("1.5")),
        Noted("recorded", decimal.Decimal("2")),
    ]


def test_record_with_a_payload_besides_the_instance_is_refused() -> None:
    events = DomainEvents()

    @events.event("x.y")
    @dataclasses.dataclass(frozen=True)
    class XY:
        a: int

    with pytest.raises(DomainEventError, match="takes no payload"):
        Order().record(XY(1), {"a": 1})  # type: ignore[arg-type]
    assert isinstance(Order().record(XY(1)), Event)  # type: ignore[arg-type]
