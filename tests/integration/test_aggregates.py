"""Aggregates record events; the session hook saves them on flush and forgets them on rollback."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import outbox
from outbox import AggregateRoot, Outbox


class Base(DeclarativeBase):
    pass


class Order(Base, AggregateRoot):
    __tablename__ = "orders"
    __aggregate_type__ = "order"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(default="new")

    def place(self) -> None:
        self.status = "placed"
        self.record("order.placed", {"status": self.status})

    def cancel(self) -> None:
        self.status = "cancelled"
        self.record("order.cancelled")


@pytest.fixture
def sessions(pg_engine: sa.Engine, outbox_schema: Outbox) -> sessionmaker[Session]:
    engine = pg_engine.execution_options(schema_translate_map={None: outbox_schema.schema})
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine)
    outbox.install(factory, outbox=outbox_schema)
    outbox.install(factory, outbox=outbox_schema)  # idempotent: events are not written twice
    return factory


def _events(pg_engine: sa.Engine, box: Outbox) -> list[tuple[str, str | None]]:
    with pg_engine.connect() as conn:
        rows = conn.execute(sa.select(box.events.c.type, box.events.c.key).order_by("seq"))
        return [(r.type, r.key) for r in rows]


def test_flush_writes_recorded_events_with_the_new_aggregate_id(
    sessions: sessionmaker[Session], pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    with sessions() as session, session.begin():
        order = Order()
        order.place()
        session.add(order)
        session.flush()
        assert order.pending_events == ()
        order_id = order.id
    assert _events(pg_engine, outbox_schema) == [("order.placed", f"order:{order_id}")]


def test_events_of_several_aggregates_keep_recording_order(
    sessions: sessionmaker[Session], pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    with sessions() as session, session.begin():
        a, b = Order(id=1), Order(id=2)
        session.add_all([a, b])
        b.place()
        a.place()
        b.cancel()
    assert _events(pg_engine, outbox_schema) == [
        ("order.placed", "order:2"),
        ("order.placed", "order:1"),
        ("order.cancelled", "order:2"),
    ]


def test_events_of_an_unchanged_and_of_a_deleted_aggregate_are_written(
    sessions: sessionmaker[Session], pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    with sessions() as session, session.begin():
        session.add_all([Order(id=1), Order(id=2)])
    with sessions() as session, session.begin():
        kept = session.get(Order, 1)
        gone = session.get(Order, 2)
        assert kept is not None and gone is not None
        kept.record("order.viewed")  # no column changed
        gone.record("order.deleted")
        session.delete(gone)
    assert sorted(_events(pg_engine, outbox_schema)) == [
        ("order.deleted", "order:2"),
        ("order.viewed", "order:1"),
    ]


def test_rollback_writes_nothing_and_forgets_pending_events(
    sessions: sessionmaker[Session], pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    with sessions() as session, session.begin():
        session.add(Order(id=1))
    with sessions() as session:
        order = session.get(Order, 1)
        assert order is not None
        order.place()
        session.flush()  # written inside the transaction...
        order.cancel()  # ...and one more recorded but not flushed
        session.rollback()
        assert order.pending_events == ()
        # The next transaction does not carry the rolled-back events along.
        order.record("order.touched")
        session.commit()
    assert _events(pg_engine, outbox_schema) == [("order.touched", "order:1")]


def test_failed_flush_then_rollback_forgets_events(
    sessions: sessionmaker[Session], pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    with sessions() as session, session.begin():
        session.add(Order(id=1))
    with sessions() as session:
        duplicate = Order(id=1)  # primary key clash: the flush fails
        duplicate.place()
        session.add(duplicate)
        with pytest.raises(sa.exc.IntegrityError):
            session.flush()
        session.rollback()
        assert duplicate.pending_events == ()
        session.add(Order(id=2))
        session.commit()
    assert _events(pg_engine, outbox_schema) == []


def test_record_validates_immediately(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(outbox.InvalidEventError, match="whitespace"):
        Order(id=1).record("order placed")


def test_events_keep_recording_order_whatever_their_ids(
    sessions: sessionmaker[Session], pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    # Caller-chosen ids (idempotency ids) that sort against the recording order.
    steps = ["created", "paid", "packed", "shipped", "delivered"]
    ids = iter(uuid.UUID(int=n) for n in range(100, 0, -1))
    with sessions() as session, session.begin():
        a, b = Order(id=1), Order(id=2)
        session.add_all([a, b])
        for step in steps:
            a.record(outbox.Event(type=f"order.{step}", id=next(ids)))
            b.record(f"order.{step}", id=next(ids))
    with sessions() as session, session.begin():  # a second flush in one session, too
        c = session.get(Order, 2)
        d = session.get(Order, 1)
        assert c is not None and d is not None
        c.record("order.returned", id=uuid.UUID(int=2))
        d.record("order.returned", id=uuid.UUID(int=1))
    expected = [(f"order.{s}", key) for s in steps for key in ("order:1", "order:2")]
    expected += [("order.returned", "order:2"), ("order.returned", "order:1")]
    assert _events(pg_engine, outbox_schema) == expected


def test_a_session_without_install_refuses_to_lose_recorded_events(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    engine = pg_engine.execution_options(schema_translate_map={None: outbox_schema.schema})
    Base.metadata.create_all(engine)
    with Session(engine) as session:  # not covered by outbox.install()
        order = Order(id=1)
        order.place()
        session.add(order)
        with pytest.raises(outbox.NotInstalledError, match=r"outbox\.install\("):
            session.commit()
        session.rollback()
    with Session(engine) as session, session.begin():
        session.add(Order(id=1))  # no recorded events: nothing to refuse
    with Session(engine) as session:
        kept = session.get(Order, 1)
        assert kept is not None
        kept.record("order.viewed")  # no column changed: still refused at flush
        with pytest.raises(outbox.NotInstalledError, match="1 event"):
            session.flush()
        session.rollback()
    with engine.connect() as conn:
        count = sa.select(sa.func.count()).select_from(outbox_schema.events)
        assert conn.execute(count).scalar() == 0
        assert conn.execute(sa.select(Order.id)).scalars().all() == [1]


def test_record_on_a_new_aggregate_fills_in_its_id_at_flush(
    sessions: sessionmaker[Session], pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    with sessions() as session, session.begin():
        order = Order()
        recorded = order.record("order.placed", headers={"tenant": "acme"})
        explicit = order.record("order.noted", key="custom")
        assert recorded.aggregate_id is None and recorded.key is None  # no id yet
        session.add(order)
        session.flush()
        order_id = order.id
    t = outbox_schema.events
    with pg_engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.id, t.c.key, t.c.aggregate_type, t.c.aggregate_id).order_by(t.c.seq)
        ).all()
    assert [tuple(r) for r in rows] == [
        (recorded.id, f"order:{order_id}", "order", str(order_id)),
        (explicit.id, "custom", "order", str(order_id)),
    ]
