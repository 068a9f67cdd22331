"""Recorded events survive what the ORM does to their aggregate before the commit: expire,
refresh (sync and async), expunge and add again (found by review: the flush skipped such an
aggregate, or the identity map let it go, and its events with it).

Every case uses a session of an installed sessionmaker and commits the aggregate's row.
SQLite in memory: the hooks are dialect-independent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import outbox
from outbox import AggregateRoot, Outbox


class Base(DeclarativeBase): ...


events = Outbox(Base.metadata)


class Order(Base, AggregateRoot):
    __tablename__ = "review_orders"
    __aggregate_type__ = "order"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(default="new")

    def place(self) -> None:
        self.status = "placed"
        self.record("order.placed", {"status": self.status})


@pytest.fixture
def maker() -> Iterator[sessionmaker[Session]]:
    engine = sa.create_engine("sqlite://")
    Base.metadata.create_all(engine)
    events.create(engine)
    sessions = sessionmaker(engine)
    outbox.install(sessions, outbox=events)
    with sessions() as s, s.begin():
        s.add(Order(id=1))
    yield sessions
    engine.dispose()


def outbox_types(sessions: sessionmaker[Session]) -> list[str]:
    with sessions() as s:
        return list(s.scalars(sa.select(events.events.c.type).order_by(events.events.c.seq)))


def _expire(s: Session) -> None:
    o = s.get(Order, 1)
    assert o is not None
    o.record("order.paid")
    s.expire(o)  # or expire_all(), or an ORM UPDATE with synchronize_session="fetch"


def _refresh(s: Session) -> None:
    o = s.get(Order, 1)
    assert o is not None
    o.record("order.paid")
    s.refresh(o)


def _record_while_expunged(s: Session) -> None:
    o = s.get(Order, 1)
    assert o is not None
    s.expunge(o)
    o.record("order.paid")  # detached: flag_dirty is skipped
    s.add(o)


LOSSES: dict[str, Callable[[Session], None]] = {
    "expire-after-record": _expire,
    "refresh-after-record": _refresh,
    "record-while-expunged-then-add": _record_while_expunged,
}


@pytest.mark.parametrize("case", LOSSES)
def test_recorded_event_is_written_or_refused(maker: sessionmaker[Session], case: str) -> None:
    with maker() as s, s.begin():
        LOSSES[case](s)  # no error is acceptable only if the event is written
    assert len(outbox_types(maker)) == 1


def test_async_refresh_after_record_keeps_the_event() -> None:
    """`await session.refresh(obj)` is idiomatic with AsyncSession (no lazy loads)."""
    import asyncio

    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    async def main() -> list[str]:
        engine = create_async_engine("sqlite+aiosqlite://")
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await conn.run_sync(events.create)
        sessions = async_sessionmaker(engine)
        outbox.install(sessions, outbox=events)
        async with sessions() as s, s.begin():
            s.add(Order(id=1))
        async with sessions() as s, s.begin():
            order = await s.get(Order, 1)
            assert order is not None
            order.record("order.paid")
            await s.refresh(order)
        async with engine.connect() as conn:
            types = list((await conn.execute(sa.select(events.events.c.type))).scalars())
        await engine.dispose()
        return types

    assert asyncio.run(main()) == ["order.paid"]
