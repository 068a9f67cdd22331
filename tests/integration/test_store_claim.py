"""The claim on PostgreSQL: per-key prefixes, busy and held keys skipped, bounded walk."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
import sqlalchemy as sa

from outbox import Event, Outbox
from relay.errors import DatabaseUnavailableError
from relay.records import Claim
from relay.store import MIN_WINDOW, Store, create_engine
from tests.support.relays import write_events

NOW = dt.datetime.now(dt.UTC)


def claim(store: Store, *, limit: int = 100, run_length: int = 10, hold: bool = True) -> Claim:
    return store.claim(
        owner="test",
        limit=limit,
        run_length=run_length,
        lease_until=NOW + dt.timedelta(seconds=30),
        now=NOW,
        dead_letters_hold_key=hold,
    )


def keys_and_seqs(c: Claim) -> list[tuple[str | None, int]]:
    return [(e.key, e.seq) for e in c.events]


def test_claims_each_keys_first_rows_up_to_the_run_length(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    store = Store(pg_engine, outbox_schema, db_timeout=10)
    write_events(
        pg_engine,
        outbox_schema,
        [Event(type="t", key=k) for k in "aabababbbb"] + [Event(type="t") for _ in range(3)],
    )
    first = claim(store, run_length=3)
    by_key: dict[str | None, list[int]] = {}
    for key, seq in keys_and_seqs(first):
        by_key.setdefault(key, []).append(seq)
    assert len(by_key["a"]) == 3  # a has 3 rows
    assert len(by_key["b"]) == 3  # b has 7, capped at the run length
    assert len(by_key[None]) == 3  # keyless rows are never capped or held
    # While those are leased, the keys are busy: nothing more of a or b.
    assert claim(store, run_length=3).events == ()


def test_retry_waiting_and_dead_rows_hold_their_key_only(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    store = Store(pg_engine, outbox_schema, db_timeout=10)
    write_events(pg_engine, outbox_schema, [Event(type="t", key=k) for k in "rrddff"])
    t = outbox_schema.events
    with pg_engine.begin() as conn:
        seqs = list(conn.scalars(sa.select(t.c.seq).order_by(t.c.seq)))
        conn.execute(
            sa.update(t)
            .where(t.c.seq == seqs[0])
            .values(next_attempt_at=NOW + dt.timedelta(hours=1))
        )
        conn.execute(sa.update(t).where(t.c.seq == seqs[2]).values(status="dead"))
    got = claim(store)
    assert {k for k, _ in keys_and_seqs(got)} == {"f"}
    # With dead letters not holding their key, d's later row may go.
    store2 = Store(pg_engine, outbox_schema, db_timeout=10)
    assert {k for k, _ in keys_and_seqs(claim(store2, hold=False))} == {"d"}


def test_busy_key_at_the_front_does_not_starve_other_keys(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """More rows of one busy key than a window holds, then another key: still found."""
    store = Store(pg_engine, outbox_schema, db_timeout=10)
    write_events(
        pg_engine,
        outbox_schema,
        [Event(type="t", key="busy") for _ in range(MIN_WINDOW + 200)]
        + [Event(type="t", key="other")],
    )
    first = claim(store, limit=10, run_length=10)
    assert {k for k, _ in keys_and_seqs(first)} == {"busy"}
    second = claim(store, limit=10, run_length=10)
    assert [k for k, _ in keys_and_seqs(second)] == ["other"]


def test_expired_lease_is_taken_over_from_the_keys_first_row(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    store = Store(pg_engine, outbox_schema, db_timeout=10)
    write_events(pg_engine, outbox_schema, [Event(type="t", key="k") for _ in range(4)])
    crashed = store.claim(
        owner="crashed",
        limit=10,
        run_length=2,
        now=NOW - dt.timedelta(minutes=5),
        lease_until=NOW - dt.timedelta(minutes=4),
        dead_letters_hold_key=True,
    )
    assert len(crashed.events) == 2
    takeover = claim(store, run_length=10)
    assert [s for _, s in keys_and_seqs(takeover)] == [e.seq for e in crashed.events] + [
        s for _, s in keys_and_seqs(takeover)
    ][2:]
    assert len(takeover.events) == 4


def test_concurrent_claims_never_share_a_row(pg_engine: sa.Engine, outbox_schema: Outbox) -> None:
    write_events(pg_engine, outbox_schema, [Event(type="t", key=f"k{i % 50}") for i in range(2000)])
    claims: list[Claim] = []
    lock = threading.Lock()

    def claimer() -> None:
        store = Store(pg_engine, outbox_schema, db_timeout=10)
        for _ in range(10):
            c = claim(store, limit=50, run_length=5)
            with lock:
                claims.append(c)

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    seqs = [e.seq for c in claims for e in c.events]
    assert len(seqs) == len(set(seqs))
    # Oldest first: the first claim takes each key's first row; then every key is busy.
    keys = [e.key for c in claims for e in c.events]
    assert sorted(keys) == sorted(f"k{i}" for i in range(50))


def test_relay_sessions_scan_the_pending_index_past_rows_that_left_it(
    pg_url: str, pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """Published rows leave dead entries in the pending index until vacuum. A bitmap scan
    would visit all of them on every claim; the relay's sessions use plain index scans, which
    mark them dead once and skip them afterwards."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key=f"k{i % 10}") for i in range(2000)])
    t = outbox_schema.events
    with pg_engine.begin() as conn:
        conn.execute(sa.update(t).values(status="published"))
    write_events(pg_engine, outbox_schema, [Event(type="t", key="new")])
    engine = create_engine(pg_url, application_name="outbox-relay:test", db_timeout=10)
    window = (
        sa.select(t.c.seq, t.c.key).where(t.c.status == "pending").order_by(t.c.seq).limit(4000)
    )
    sql = str(window.compile(engine, compile_kwargs={"literal_binds": True}))
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW enable_bitmapscan").scalar_one() == "off"
            plan = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {sql}"))
    finally:
        engine.dispose()
    assert "Bitmap" not in plan and "Index Scan using" in plan, plan
    store = Store(pg_engine, outbox_schema, db_timeout=10)
    assert [k for k, _ in keys_and_seqs(claim(store))] == ["new"]


def test_a_claim_on_a_killed_session_fails_as_an_outage_and_the_next_one_reconnects(
    pg_url: str, pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    # The error must read as an outage, and the dead connection must not go back to the
    # pool, or every later claim would fail on it too.
    write_events(pg_engine, outbox_schema, [Event(type="t", key="k")])
    engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    store = Store(engine, outbox_schema, db_timeout=10)
    try:
        with engine.connect() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with pg_engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
        with pytest.raises(DatabaseUnavailableError):
            claim(store)
        assert [k for k, _ in keys_and_seqs(claim(store))] == ["k"]
    finally:
        engine.dispose()
