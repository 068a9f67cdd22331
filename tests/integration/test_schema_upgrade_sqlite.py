"""Upgrading a schema-1 outbox on SQLite keeps every key's state: a dead head still holds its
key, a head waiting for its retry still waits (found by review: the generic adoption of
pending keys used to take their place first, unheld and ready)."""

from __future__ import annotations

import datetime as dt
import uuid

import sqlalchemy as sa

from outbox import Outbox
from relay.store import Store


def _v1_sqlite(url: str) -> tuple[sa.Engine, Outbox]:
    engine = sa.create_engine(url)
    # Schema 1 had the events table (no key table, no key trigger).
    Outbox(sa.MetaData()).events.create(engine)
    return engine, Outbox(sa.MetaData())


def _insert(engine: sa.Engine, key: str, **extra: object) -> int:
    with engine.begin() as conn:
        row = {
            "id": uuid.uuid4().hex,
            "type": "t",
            "key": key,
            "routing_key": "t",
            "payload": "{}",
            "occurred_at": "2026-01-01 00:00:00.000000",
            "status": "pending",
            "attempts": 0,
            "version": 1,
            **extra,
        }
        cols = ", ".join(row)
        vals = ", ".join(f":{c}" for c in row)
        conn.execute(sa.text(f"INSERT INTO outbox ({cols}) VALUES ({vals})"), row)
        return int(conn.execute(sa.text("SELECT max(seq) FROM outbox")).scalar_one())


def _claim(store: Store) -> dict[str | None, list[int]]:
    moment = dt.datetime.now(dt.UTC)
    c = store.claim(
        owner="new",
        limit=100,
        run_length=10,
        lease_until=moment + dt.timedelta(seconds=30),
        now=moment,
    )
    got: dict[str | None, list[int]] = {}
    for e in c.events:
        got.setdefault(e.key, []).append(e.seq)
    return got


def test_sqlite_upgrade_keeps_a_dead_head_holding_its_key(sqlite_url: str) -> None:
    engine, box = _v1_sqlite(sqlite_url)
    _insert(engine, "dead", status="dead", attempts=10)
    behind = _insert(engine, "dead")  # must wait behind the dead head (hold mode, default)
    box.create(engine)
    k = box.keys
    with engine.connect() as conn:
        held = conn.execute(sa.select(k.c.held).where(k.c.key == "dead")).scalar_one()
    got = _claim(Store(engine, box, db_timeout=10))
    assert held, "the upgrade lost the hold of key 'dead' (its row came from _adopt_keys)"
    assert "dead" not in got, f"event {behind} published past its key's dead head: {got}"


def test_sqlite_upgrade_keeps_a_retrying_head_waiting(sqlite_url: str) -> None:
    engine, box = _v1_sqlite(sqlite_url)
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S.%f")
    _insert(engine, "retry", attempts=1, next_attempt_at=later)
    _insert(engine, "retry")
    box.create(engine)
    got = _claim(Store(engine, box, db_timeout=10))
    assert "retry" not in got, f"a head waiting for its retry an hour from now was claimed: {got}"


def test_sqlite_upgrade_adds_the_relays_broker_node(sqlite_url: str) -> None:
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:  # schema 1's table of relays
        conn.exec_driver_sql(
            "CREATE TABLE outbox_relay (name TEXT PRIMARY KEY, host TEXT NOT NULL, "
            "pid INTEGER NOT NULL, started_at DATETIME NOT NULL, heartbeat_at DATETIME NOT NULL)"
        )
    Outbox(sa.MetaData()).events.create(engine)
    box = Outbox(sa.MetaData())
    box.create(engine)
    moment = dt.datetime.now(dt.UTC)
    store = Store(engine, box, db_timeout=10)
    store.heartbeat(name="r", host="h", pid=1, started_at=moment, now=moment, broker_node="n1:5672")
    with engine.connect() as conn:
        assert conn.execute(sa.select(box.relays.c.broker_node)).scalar_one() == "n1:5672"
    engine.dispose()
