"""Applications in REPEATABLE READ or SERIALIZABLE write events while relays work the same
keys: their transactions commit (found by review: the trigger's key-row insert used to fail
with a serialization error whenever a relay had touched the key since the snapshot)."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

import outbox
from outbox import Event, Outbox
from relay.records import Claim
from relay.store import Store
from tests.support.relays import write_events


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def claim(
    store: Store,
    *,
    at: dt.datetime | None = None,
    lease: float = 30,
    limit: int = 100,
    owner: str = "test",
) -> Claim:
    moment = at or now()
    return store.claim(
        owner=owner,
        limit=limit,
        run_length=10,
        lease_until=moment + dt.timedelta(seconds=lease),
        now=moment,
    )


@pytest.fixture
def store(pg_engine: sa.Engine, outbox_schema: Outbox) -> Store:
    return Store(pg_engine, outbox_schema, db_timeout=10)


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_snapshot_writer_of_a_key_a_relay_just_leased_commits(
    pg_engine: sa.Engine, outbox_schema: Outbox, store: Store, isolation: str
) -> None:
    """A relay leases the key after the application's snapshot was taken; the trigger's
    key-row insert conflicts with a row version the snapshot cannot see, and must go on."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key="order-1")])
    with pg_engine.connect() as conn:
        conn = conn.execution_options(isolation_level=isolation)
        with conn.begin():
            conn.execute(sa.text("SELECT 1"))  # the application's snapshot is taken
            assert [e.key for e in claim(store).events] == ["order-1"]  # relay leases the key
            outbox.write(conn, Event(type="t", key="order-1"), outbox=outbox_schema)


def test_two_snapshot_writers_of_a_new_key_both_commit(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """Two REPEATABLE READ application transactions write the first events of a new key: the
    second one's snapshot cannot see the key row the first one created."""
    with pg_engine.connect() as a:
        a = a.execution_options(isolation_level="REPEATABLE READ")
        with a.begin():
            a.execute(sa.text("SELECT 1"))
            write_events(pg_engine, outbox_schema, [Event(type="t", key="new-key")])
            outbox.write(a, Event(type="t", key="new-key"), outbox=outbox_schema)
