"""The writer with asyncio sessions (FastAPI apps) and on SQLite (embedded apps)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

import outbox
from outbox import Event, Outbox

from .test_aggregates import Base, Order


def _types(engine: sa.Engine, box: Outbox) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.select(box.events.c.type).order_by(box.events.c.seq)))


@pytest.mark.asyncio
async def test_async_session_commit_and_rollback(
    pg_url: str, pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    engine = create_async_engine(pg_url)
    try:
        async with AsyncSession(engine) as session:
            await outbox.write_async(session, Event(type="rolled.back"), outbox=outbox_schema)
            await session.rollback()
            async with session.begin():
                await outbox.write_async(session, Event(type="kept"), outbox=outbox_schema)
        async with engine.begin() as conn:
            await outbox.write_async(conn, Event(type="via.connection"), outbox=outbox_schema)
    finally:
        await engine.dispose()
    assert _types(pg_engine, outbox_schema) == ["kept", "via.connection"]


@pytest.mark.asyncio
async def test_async_sessionmaker_hook_writes_aggregate_events(
    pg_url: str, pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    engine = create_async_engine(
        pg_url, execution_options={"schema_translate_map": {None: outbox_schema.schema}}
    )
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        factory = async_sessionmaker(engine)
        outbox.install(factory, outbox=outbox_schema)
        async with factory() as session, session.begin():
            order = Order(id=7)
            order.place()
            session.add(order)
        other = async_sessionmaker(engine)  # not installed: it refuses recorded events
        async with other() as session:
            stray = Order(id=8)
            stray.place()
            session.add(stray)
            with pytest.raises(outbox.NotInstalledError, match=r"outbox\.install"):
                await session.commit()
    finally:
        await engine.dispose()
    assert _types(pg_engine, outbox_schema) == ["order.placed"]


@pytest.mark.asyncio
async def test_write_async_refuses_sync_bind_and_write_refuses_async(pg_url: str) -> None:
    engine = create_async_engine(pg_url)
    try:
        async with AsyncSession(engine) as session:
            with pytest.raises(outbox.UnsupportedBindError, match="write_async"):
                outbox.write(session, Event(type="a.b"))  # type: ignore[arg-type]
        with pytest.raises(outbox.UnsupportedBindError, match="AsyncSession"):
            await outbox.write_async(object(), Event(type="a.b"))  # type: ignore[arg-type]
    finally:
        await engine.dispose()


def test_sqlite_commit_rollback_and_hook(sqlite_url: str) -> None:
    engine = sa.create_engine(sqlite_url)
    box = Outbox()
    box.create(engine)
    box.create(engine)
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine)
    outbox.install(factory, outbox=box)
    with factory() as session:
        outbox.write(session, Event(type="rolled.back"), outbox=box)
        session.rollback()
    with factory() as session, session.begin():
        outbox.write(session, Event(type="first", key="k"), outbox=box)
        order = Order(id=1)
        order.place()
        session.add(order)
    assert _types(engine, box) == ["first", "order.placed"]
    engine.dispose()


@pytest.mark.asyncio
async def test_sqlite_async(tmp_path: object) -> None:
    sync = sa.create_engine(f"sqlite:///{tmp_path}/a.db")
    box = Outbox()
    box.create(sync)
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/a.db")
    try:
        async with AsyncSession(engine) as session, session.begin():
            await outbox.write_async(session, Event(type="a.b", key="k"), outbox=box)
    finally:
        await engine.dispose()
    assert _types(sync, box) == ["a.b"]
    sync.dispose()


def test_session_from_plain_sessionmaker_without_hook_refuses_recorded_events(
    sqlite_url: str,
) -> None:
    engine = sa.create_engine(sqlite_url)
    box = Outbox()
    box.create(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        order = Order(id=1)
        order.place()
        session.add(order)
        with pytest.raises(outbox.NotInstalledError, match=r"outbox\.install"):
            session.commit()
    assert _types(engine, box) == []
    engine.dispose()


@pytest.mark.asyncio
async def test_create_with_an_async_engine_says_to_use_run_sync(
    pg_url: str, pg_engine: sa.Engine, schema_name: str
) -> None:
    engine = create_async_engine(pg_url)
    box = Outbox(schema=schema_name)
    try:
        with pytest.raises(outbox.OutboxError, match=r"run_sync\(outbox.create\)"):
            box.create(engine)  # type: ignore[arg-type]
        async with engine.begin() as conn:
            await conn.run_sync(box.create)
    finally:
        await engine.dispose()
    with pg_engine.connect() as conn:
        assert sa.inspect(conn).has_table(box.keys.name, schema=schema_name)
