"""The claim on PostgreSQL: keys claimed fairly, held and busy keys never in the way, one
snapshot per decision, and several relays claiming at once without a global lock.

Interleavings are forced with hooks between the claim's statements (the key lock and the
read of the keys' rows) and a second connection, not left to chance.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import outbox
from outbox import Event, Outbox
from relay.admin import Admin
from relay.admin_records import Selector
from relay.driver_sql import DriverStatement
from relay.errors import DatabaseUnavailableError
from relay.records import Claim, ClaimedEvent, Failure
from relay.store import DRAINABLE_KEYS, Store, create_engine
from tests.support.claim_pause import ClaimPause
from tests.support.relays import write_events
from tests.support.sessions import terminate_pooled_sessions


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def claim(store: Store, *, limit: int = 100, run_length: int = 10, owner: str = "test") -> Claim:
    moment = now()
    return store.claim(
        owner=owner,
        limit=limit,
        run_length=run_length,
        lease_until=moment + dt.timedelta(seconds=30),
        now=moment,
    )


def by_key(c: Claim) -> dict[str | None, list[int]]:
    keys: dict[str | None, list[int]] = {}
    for event in c.events:
        keys.setdefault(event.key, []).append(event.seq)
    return keys


def pending_seqs(engine: sa.Engine, box: Outbox, key: str) -> list[int]:
    t = box.events
    with engine.connect() as conn:
        return list(
            conn.scalars(
                sa.select(t.c.seq).where(t.c.key == key, t.c.status == "pending").order_by(t.c.seq)
            )
        )


def kill_head(store: Store, key: str, *, hold: bool = True) -> None:
    """Claim `key` and record its head's final failure, the way a relay does."""
    c = claim(store, limit=1, run_length=1)
    (head,) = c.events
    assert head.key == key
    failure = Failure(event=head, error="unroutable", next_attempt_at=None)
    assert store.record_failures(c.token, [failure], relay="r", now=now(), hold_key=hold) == 1


@pytest.fixture
def store(pg_engine: sa.Engine, outbox_schema: Outbox) -> Store:
    return Store(pg_engine, outbox_schema, db_timeout=10)


def test_claims_each_keys_first_rows_up_to_the_run_length(
    pg_engine: sa.Engine, outbox_schema: Outbox, store: Store
) -> None:
    write_events(
        pg_engine,
        outbox_schema,
        [Event(type="t", key=k) for k in "aabababbbb"] + [Event(type="t") for _ in range(3)],
    )
    first = by_key(claim(store, run_length=3))
    assert first["a"] == pending_seqs(pg_engine, outbox_schema, "a")[:3]
    assert first["b"] == pending_seqs(pg_engine, outbox_schema, "b")[:3]
    assert len(first[None]) == 3  # events without a key are never capped by a run
    # While those are leased, the keys are busy: nothing more of a or b.
    assert claim(store, run_length=3).events == ()


def test_a_dead_head_in_front_of_a_large_backlog_never_stalls_other_keys(
    pg_engine: sa.Engine, outbox_schema: Outbox, store: Store
) -> None:
    """Finding 1: a dead head of key `hot`, thousands of events behind it (more than the
    old claim's whole visit budget of 4,000 rows), then one event on each of 50 keys."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key="hot")])
    kill_head(store, "hot")
    write_events(pg_engine, outbox_schema, [Event(type="t", key="hot") for _ in range(5000)])
    write_events(pg_engine, outbox_schema, [Event(type="t", key=f"k{i}") for i in range(50)])
    got = by_key(claim(store, limit=100))
    assert set(got) == {f"k{i}" for i in range(50)}
    assert store.has_ready(now()) is False  # the held key is not "ready"


def test_a_busy_key_gets_its_run_per_claim_like_any_other_key(
    pg_engine: sa.Engine, outbox_schema: Outbox, store: Store
) -> None:
    """Finding 2: 5,000 events on one key written first, then 50 other keys."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key="busy") for _ in range(5000)])
    write_events(pg_engine, outbox_schema, [Event(type="t", key=f"k{i}") for i in range(50)])
    got = by_key(claim(store, limit=200, run_length=10))
    assert set(got) == {"busy", *(f"k{i}" for i in range(50))}
    # Its turns, at most twice its share of the batch (200 rows over 51 keys: 4), never more
    # than the run length: the rest of its backlog waits for the next claim.
    assert got["busy"] == pending_seqs(pg_engine, outbox_schema, "busy")[:8]
    assert "busy" not in by_key(claim(store, limit=1000, run_length=10))  # still leased


def test_a_claim_shares_its_batch_among_the_keys_it_locks(
    pg_engine: sa.Engine, outbox_schema: Outbox, store: Store
) -> None:
    """1,000 keys of 5 events each and a batch of 1,000: every key gets one event (the claim
    keeps all of them in flight), rather than the first twenty keys their run of 50."""
    write_events(
        pg_engine,
        outbox_schema,
        [Event(type="t", key=f"k{i}") for _ in range(5) for i in range(1000)],
    )
    got = by_key(claim(store, limit=1000, run_length=50))
    assert len(got) == 1000
    for key, seqs in got.items():
        assert key is not None
        assert seqs == pending_seqs(pg_engine, outbox_schema, key)[:1]


def test_a_claim_gives_the_turns_of_short_keys_to_longer_ones_in_rounds(
    pg_engine: sa.Engine, outbox_schema: Outbox, store: Store
) -> None:
    """Rounds: every key's first row, then every key's second... A claim's room that ends
    inside a round cuts the keys after the last one served, each key's rows still the first
    of its pending rows (a prefix of its order)."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key="big") for _ in range(30)])
    write_events(pg_engine, outbox_schema, [Event(type="t", key=f"s{i}") for i in range(9)])
    # 10 keys, a batch of 20: a share of 2, at most 4 each. The nine short keys take one
    # each; "big" takes its four.
    got = by_key(claim(store, limit=20, run_length=50))
    assert {key: len(seqs) for key, seqs in got.items()} == {"big": 4} | {
        f"s{i}": 1 for i in range(9)
    }
    assert got["big"] == pending_seqs(pg_engine, outbox_schema, "big")[:4]

    write_events(
        pg_engine, outbox_schema, [Event(type="t", key=k) for _ in range(10) for k in "abc"]
    )
    # Three keys, room for 7: rounds of three, the third cut after the first key.
    got = by_key(claim(store, limit=7, run_length=50))
    assert {key: len(seqs) for key, seqs in got.items()} == {"a": 3, "b": 2, "c": 2}
    for key in "abc":
        assert got[key] == pending_seqs(pg_engine, outbox_schema, key)[: len(got[key])]


def test_a_key_row_with_nothing_pending_is_dropped_wherever_it_is_in_the_line(
    pg_engine: sa.Engine, outbox_schema: Outbox, store: Store
) -> None:
    """A key row without pending events (here: left by hand, last in line) is deleted by the
    claim that locks it once the claim's rounds went past the first: every key with rows
    was served then, so a key without any is empty, not cut."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key="k") for _ in range(3)])
    k = outbox_schema.keys
    with pg_engine.begin() as conn:
        conn.execute(sa.insert(k).values(key="ghost", available_at=now()))
    got = by_key(claim(store, limit=4, run_length=50))
    assert set(got) == {"k"} and len(got["k"]) == 3
    with pg_engine.connect() as conn:
        assert conn.execute(sa.select(k.c.key)).scalars().all() == ["k"]


def test_freed_keys_go_to_the_back_of_the_line(
    pg_engine: sa.Engine, outbox_schema: Outbox, store: Store
) -> None:
    """Round-robin: a key served and freed waits behind keys that were waiting before."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key="busy") for _ in range(50)])
    first = claim(store, limit=5, run_length=5)
    assert set(by_key(first)) == {"busy"}
    write_events(pg_engine, outbox_schema, [Event(type="t", key=f"k{i}") for i in range(5)])
    assert store.mark_published(
        {first.token: [e.seq for e in first.events]}, now=now(), delete=False
    )
    assert store.free_keys({first.token: {"busy"}}, now=now()) == 1
    second = claim(store, limit=5, run_length=5)
    assert set(by_key(second)) == {f"k{i}" for i in range(5)}


def test_retry_waiting_and_dead_keys_are_held_and_skipping_dead_letters_frees_the_key(
    pg_engine: sa.Engine, outbox_schema: Outbox, store: Store
) -> None:
    write_events(pg_engine, outbox_schema, [Event(type="t", key=k) for k in "rrddssff"])
    c = claim(store, limit=3, run_length=1)
    heads = {e.key: e for e in c.events}
    assert set(heads) == {"r", "d", "s"}
    later = now() + dt.timedelta(hours=1)
    failures = [
        Failure(event=heads["r"], error="nack", next_attempt_at=later),
        Failure(event=heads["d"], error="unroutable", next_attempt_at=None),
    ]
    assert store.record_failures(c.token, failures, relay="r", now=now(), hold_key=True) == 2
    skipped = Failure(event=heads["s"], error="unroutable", next_attempt_at=None)
    assert store.record_failures(c.token, [skipped], relay="r", now=now(), hold_key=False) == 1
    got = by_key(claim(store))
    assert set(got) == {"f", "s"}  # r waits for its retry, d is held, s's dead head skipped
    assert got["s"] == pending_seqs(pg_engine, outbox_schema, "s")


def test_an_expired_lease_is_taken_over_from_the_keys_first_pending_row(
    pg_engine: sa.Engine, outbox_schema: Outbox, store: Store
) -> None:
    write_events(pg_engine, outbox_schema, [Event(type="t", key="k") for _ in range(4)])
    past = now() - dt.timedelta(minutes=5)
    crashed = store.claim(
        owner="crashed",
        limit=10,
        run_length=2,
        now=past,
        lease_until=past + dt.timedelta(seconds=30),
    )
    assert len(crashed.events) == 2
    takeover = claim(store, run_length=10)
    assert [e.seq for e in takeover.events] == pending_seqs(pg_engine, outbox_schema, "k")
    # The crashed relay's late writes are fenced off, every one of them.
    seqs = [e.seq for e in crashed.events]
    assert store.mark_published({crashed.token: seqs}, now=now(), delete=False) == 0
    failure = Failure(event=crashed.events[0], error="x", next_attempt_at=None)
    assert store.record_failures(crashed.token, [failure], relay="r", now=now()) == 0
    assert store.release(crashed.token, seqs) == 0
    assert store.free_keys({crashed.token: {"k"}}, now=now()) == 0
    assert store.renew({crashed.token}, now() + dt.timedelta(minutes=1)) == set()
    assert store.renew({takeover.token}, now() + dt.timedelta(minutes=1)) == {takeover.token}


class Paused:
    """Stops a store's next claim on the server between its two statements (keys locked,
    events not yet read: `ClaimPause`) until released."""

    def __init__(self, store: Store) -> None:
        self.pause = ClaimPause(store, after="lock")

    def run(self, job: Callable[[], Claim]) -> Callable[[], Claim]:
        """Start `job` in a thread; returns a function that joins it and gives its result."""
        result: list[Claim] = []
        errors: list[BaseException] = []

        def target() -> None:
            try:
                result.append(job())
            except BaseException as exc:  # handed to the test thread
                errors.append(exc)

        self.pause.arm()
        thread = threading.Thread(target=target)
        thread.start()
        self.pause.wait_held(20)

        def join() -> Claim:
            self.pause.close()
            thread.join(20)
            if errors:
                raise errors[0]
            return result[0]

        return join


def test_claims_of_several_relays_overlap_in_time_and_take_disjoint_keys(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """Finding 5: no global lock. Claim A holds its keys locked (paused between its two
    statements); claim B runs to completion meanwhile and takes the other keys."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key=f"k{i}") for i in range(20)])
    a, b = (Store(pg_engine, outbox_schema, db_timeout=10) for _ in range(2))
    pause = Paused(a)
    join_a = pause.run(lambda: claim(a, limit=10, owner="a"))
    claim_b = claim(b, limit=100, owner="b")  # finishes while A is still inside its claim
    claim_a = join_a()
    keys_a, keys_b = set(by_key(claim_a)), set(by_key(claim_b))
    assert len(keys_a) == 10 and len(keys_b) == 10
    assert keys_a.isdisjoint(keys_b)


def test_a_late_writer_committing_inside_a_claim_keeps_the_key_a_gap_free_prefix(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """Finding 3: rows of a locked key that commit between the key lock and the read are
    read as part of one snapshot: what is leased is a prefix of the key's pending rows."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key="k")])
    store = Store(pg_engine, outbox_schema, db_timeout=10)
    pause = Paused(store)
    join = pause.run(lambda: claim(store, run_length=10))
    write_events(pg_engine, outbox_schema, [Event(type="t", key="k") for _ in range(3)])
    got = join()
    assert [e.seq for e in got.events] == pending_seqs(pg_engine, outbox_schema, "k")


def test_a_requeue_racing_a_claim_keeps_the_requeued_head_first(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """Finding 3, the requeue: a held key's head is requeued while a claim is between its
    statements. The held key was not locked by that claim, and the next claim of the key
    starts at the requeued head, never at the rows behind it."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key="k")])
    store = Store(pg_engine, outbox_schema, db_timeout=10)
    kill_head(store, "k")
    write_events(pg_engine, outbox_schema, [Event(type="t", key="k") for _ in range(3)])
    write_events(pg_engine, outbox_schema, [Event(type="t", key="other")])
    admin = Admin(pg_engine, outbox_schema)
    pause = Paused(store)
    join = pause.run(lambda: claim(store))
    assert admin.requeue(admin.plan(Selector(everything=True))) == 1
    assert set(by_key(join())) == {"other"}
    again = claim(store)
    t = outbox_schema.events
    with pg_engine.connect() as conn:
        every = list(conn.scalars(sa.select(t.c.seq).where(t.c.key == "k").order_by(t.c.seq)))
    assert by_key(again)["k"] == every  # the requeued head, then the rest


def test_a_purge_racing_a_claim_releases_the_key_at_its_next_row(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """A held key's dead head is purged while a claim is between its statements: the key's
    later rows go out from its first pending row on, in order, and nothing else moves."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key="k")])
    store = Store(pg_engine, outbox_schema, db_timeout=10)
    kill_head(store, "k")
    write_events(pg_engine, outbox_schema, [Event(type="t", key="k") for _ in range(3)])
    write_events(pg_engine, outbox_schema, [Event(type="t", key="other")])
    admin = Admin(pg_engine, outbox_schema)
    pause = Paused(store)
    join = pause.run(lambda: claim(store))
    assert admin.purge_dead(admin.plan(Selector(everything=True))) == 1
    assert set(by_key(join())) == {"other"}
    assert by_key(claim(store))["k"] == pending_seqs(pg_engine, outbox_schema, "k")


def wait_until_blocked(engine: sa.Engine, application_name: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            waiting = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %(name)s "
                "AND wait_event_type = 'Lock'",
                {"name": application_name},
            ).scalar_one()
        if waiting:
            return
        time.sleep(0.02)
    raise AssertionError(f"{application_name} never waited for a lock")


def test_a_previous_owners_final_failure_racing_a_takeover_is_fenced(
    pg_url: str, pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """Finding 4: between a claim's read and its lease, the previous owner (lease expired)
    records the head's death. Its write waits for the claim's key lock, then finds the key
    leased by another token and changes nothing: no gapped run, no held key leased."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key="k") for _ in range(3)])
    old_engine = create_engine(pg_url, application_name="old-owner", db_timeout=10)
    old = Store(old_engine, outbox_schema, db_timeout=10)
    past = now() - dt.timedelta(minutes=5)
    stale = old.claim(
        owner="old", limit=10, run_length=1, now=past, lease_until=past + dt.timedelta(seconds=1)
    )
    new = Store(pg_engine, outbox_schema, db_timeout=10)
    pause = Paused(new)
    join = pause.run(lambda: claim(new, run_length=10, owner="new"))
    recorded: list[int] = []
    failure = Failure(event=stale.events[0], error="unroutable", next_attempt_at=None)
    writer = threading.Thread(
        target=lambda: recorded.append(
            old.record_failures(stale.token, [failure], relay="old", now=now())
        )
    )
    writer.start()
    try:
        wait_until_blocked(pg_engine, "old-owner")
        takeover = join()
        writer.join(10)
    finally:
        old_engine.dispose()
    assert recorded == [0]
    assert [e.seq for e in takeover.events] == pending_seqs(pg_engine, outbox_schema, "k")
    k = outbox_schema.keys
    with pg_engine.connect() as conn:
        row = conn.execute(sa.select(k).where(k.c.key == "k")).one()
    assert row.lease_token == takeover.token and not row.held


def test_concurrent_claims_never_share_a_key(pg_engine: sa.Engine, outbox_schema: Outbox) -> None:
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
    # Nothing is freed meanwhile, so each key is leased once, with its first rows (at most
    # 5; fewer when the claim that took it shared its batch among more keys).
    owners: dict[str | None, set[uuid.UUID]] = {}
    for c in claims:
        for event in c.events:
            owners.setdefault(event.key, set()).add(c.token)
    assert set(owners) == {f"k{i}" for i in range(50)}
    assert all(len(tokens) == 1 for tokens in owners.values())
    for key, got in by_key(
        Claim(uuid.uuid4(), tuple(e for c in claims for e in c.events), now())
    ).items():
        assert key is not None
        assert 1 <= len(got) <= 5
        assert got == pending_seqs(pg_engine, outbox_schema, key)[: len(got)]


def test_a_drained_key_is_removed_but_never_under_a_writer_in_progress(
    pg_engine: sa.Engine, outbox_schema: Outbox, store: Store
) -> None:
    """A key row is deleted once its key has no pending event, under the writers' per-key
    lock: a writer that has numbered a row of the key and not committed keeps the key row,
    and its event is claimed after it commits."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key="k")])
    c = claim(store)
    assert store.mark_published({c.token: [e.seq for e in c.events]}, now=now(), delete=False)
    k = outbox_schema.keys
    with pg_engine.connect() as writer, writer.begin():
        outbox.write(writer, Event(type="t", key="k"), outbox=outbox_schema)
        # The relay frees the key while the writer is still in its transaction.
        assert store.free_keys({c.token: {"k"}}, now=now()) == 1
        with pg_engine.connect() as conn:
            assert conn.execute(sa.select(k.c.key)).scalars().all() == ["k"]
    assert [e.key for e in claim(store).events] == ["k"]


@pytest.mark.parametrize("isolation", ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"])
def test_a_writer_whose_snapshot_predates_the_key_removal_still_tracks_its_key(
    pg_engine: sa.Engine, outbox_schema: Outbox, store: Store, isolation: str
) -> None:
    """Under REPEATABLE READ a writer's snapshot can still show a key row that a relay has
    removed since: its trigger must not trust that snapshot."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key="k")])
    c = claim(store)
    store.mark_published({c.token: [e.seq for e in c.events]}, now=now(), delete=False)
    writer = pg_engine.connect().execution_options(isolation_level=isolation)
    with writer, writer.begin():
        k = outbox_schema.keys
        assert writer.execute(sa.select(k.c.key)).scalars().all() == ["k"]  # snapshot
        assert store.free_keys({c.token: {"k"}}, now=now()) == 1  # removes the key row
        outbox.write(writer, Event(type="t", key="k"), outbox=outbox_schema)
    assert [e.key for e in claim(store).events] == ["k"]


def test_the_claim_reads_only_what_it_returns_next_to_a_huge_key(
    pg_url: str, pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """One key with 20,000 pending events and one with one, statistics up to date: the read of
    each key's first rows goes by the index of pending rows by key, never by the table's seq
    order (which walked all 20,000 rows to find the small key's one: found by the fairness
    benchmark). No planner setting of the relay's engine is changed for it."""
    table = f'"{outbox_schema.schema}"."{outbox_schema.name}"'
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(
            f"INSERT INTO {table} (id, type, key, routing_key, payload, occurred_at) "
            "SELECT gen_random_uuid(), 't', 'busy', 't', '{}', now() "
            "FROM generate_series(1, 20000)"
        )
    write_events(pg_engine, outbox_schema, [Event(type="t", key="small"), Event(type="t")])
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(f"ANALYZE {table}")
    engine = create_engine(pg_url, application_name="outbox-relay:test", db_timeout=10)
    store = Store(engine, outbox_schema, db_timeout=10, keep_connections=True)
    moment = now()
    parameters = {
        "token": uuid.uuid4(),
        "owner": "t",
        "limit": 100,
        "keyless_limit": 50,
        "run_length": 10,
        "lease_until": moment,
        "now": moment,
    }
    read = store._claim_prepared
    try:
        # The plan the relay runs: the generic plan of the prepared read, keys from the setting.
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW enable_bitmapscan").scalar_one() == "on"
            driver = conn.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            script = psycopg.ClientCursor(driver)
            script.execute(read.prepare_sql)
            for step, text in store._claim_script(read):
                if step != "read":  # the settings, and the lock, which sets the keys
                    script.execute(
                        text, store._driver_statements["_lock_claim_keys"].parameters(parameters)
                    )
            # The plan is made by the EXPLAIN below: with JIT on, it would be compiled now.
            script.execute("SET LOCAL jit_above_cost = 0")
            script.execute(
                "EXPLAIN (ANALYZE, VERBOSE, FORMAT TEXT) " + read.execute_sql,
                read.parameters(parameters),
            )
            plan = "\n".join(row[0] for row in script.fetchall())
            conn.rollback()
        claimed = by_key(claim(store))
        # ...and the relay's session chose it too.
        with store._driver() as cursor:
            cursor.execute(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE name = %s",
                (read.name,),
            )
            generic, custom = cursor.fetchone() or (0, 0)
        assert generic >= 1 and custom == 0
    finally:
        store.close()
        engine.dispose()
    removed = [int(n) for n in re.findall(r"Rows Removed by Filter: (\d+)", plan)]
    assert max(removed, default=0) < 100, plan
    assert not re.search(r"Seq Scan on \S*outbox ", plan), plan
    # No bitmap scan of the events (it visits every dead entry of the pending index).
    assert not re.search(r"Bitmap (Heap Scan on \S*outbox |Index Scan on outbox_(?!key_))", plan)
    assert re.search(r"Function Scan on \S*unnest .* loops=1\)", plan), plan
    assert "JIT:" not in plan, plan
    assert f"{outbox_schema.name}_bykey_idx" in plan, plan
    assert len(claimed["busy"]) == 10 and len(claimed["small"]) == 1 and len(claimed[None]) == 1


def test_lease_renewal_reads_the_lease_token_index(
    pg_engine: sa.Engine, outbox_schema: Outbox, store: Store
) -> None:
    write_events(pg_engine, outbox_schema, [Event(type="t", key=f"k{i}") for i in range(200)])
    c = claim(store, limit=10)
    k = outbox_schema.keys
    renew = sa.update(k).where(k.c.lease_token == c.token).values(available_at=now())
    sql = str(renew.compile(pg_engine, compile_kwargs={"literal_binds": True}))
    with pg_engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")  # a 200-row table: force it
        plan = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {sql}"))
    assert f"{outbox_schema.name}_key_token" in plan, plan
    assert store.renew({c.token}, now() + dt.timedelta(minutes=1)) == {c.token}


def test_keys_of_255_bytes_and_names_that_need_quoting(
    pg_engine: sa.Engine, schema_name: str
) -> None:
    box = Outbox(table="order", schema=schema_name + "_Sales")
    box.create(pg_engine)
    try:
        store = Store(pg_engine, box, db_timeout=10)
        long_key = "é" * 127 + "x"  # 255 bytes of UTF-8
        write_events(pg_engine, box, [Event(type="t", key=long_key) for _ in range(3)])
        got = claim(store)
        assert by_key(got) == {long_key: pending_seqs(pg_engine, box, long_key)}
    finally:
        with pg_engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema_name}_Sales" CASCADE')


def test_an_empty_table_claims_nothing(store: Store) -> None:
    assert claim(store).events == ()
    assert store.has_ready(now()) is False


def test_a_claim_on_a_killed_session_fails_as_an_outage_and_the_next_one_reconnects(
    pg_url: str, pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    # The error must read as an outage, and the dead connection must not go back to the
    # pool, or every later claim would fail on it too.
    write_events(pg_engine, outbox_schema, [Event(type="t", key="k")])
    engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    store = Store(engine, outbox_schema, db_timeout=10)
    try:
        terminate_pooled_sessions(engine, pg_engine)
        with pytest.raises(DatabaseUnavailableError):
            claim(store)
        assert [e.key for e in claim(store).events] == ["k"]
    finally:
        engine.dispose()


def test_a_late_confirm_racing_a_takeover_is_fenced_and_no_key_is_held_without_a_dead_event(
    pg_url: str, pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """Found by review. Relay A's lease on K ran out; relay B's claim has locked K and not yet
    committed; A's late confirm of K's head arrives. A's mark must wait for B's claim and then
    be fenced: marked through, B would hold an already published event, and B's final failure
    of it would hold K with no dead event to requeue or purge."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key="K") for _ in range(3)])
    old_engine = create_engine(pg_url, application_name="late-confirm", db_timeout=10)
    a = Store(old_engine, outbox_schema, db_timeout=10)
    b = Store(pg_engine, outbox_schema, db_timeout=10)
    past = now() - dt.timedelta(minutes=5)
    first = a.claim(
        owner="a", limit=10, run_length=10, now=past, lease_until=past + dt.timedelta(seconds=1)
    )
    head = first.events[0]
    pause = Paused(b)
    join = pause.run(lambda: claim(b, owner="b"))
    marked: list[int] = []
    late = threading.Thread(
        target=lambda: marked.append(
            a.mark_published({first.token: [head.seq]}, now=now(), delete=False)
        )
    )
    late.start()
    try:
        wait_until_blocked(pg_engine, "late-confirm")
        second = join()
        late.join(10)
    finally:
        old_engine.dispose()
    assert marked == [0]
    assert second.events[0].seq == head.seq
    failure = Failure(event=second.events[0], error="unroutable", next_attempt_at=None)
    assert b.record_failures(second.token, [failure], relay="b", now=now()) == 1
    t, k = outbox_schema.events, outbox_schema.keys
    with pg_engine.connect() as conn:
        held = conn.execute(sa.select(k.c.held).where(k.c.key == "K")).scalar_one()
        dead = conn.execute(sa.select(sa.func.count()).where(t.c.status == "dead")).scalar_one()
    assert held and dead == 1


def test_a_failure_of_an_event_published_meanwhile_frees_its_key_without_holding_it(
    pg_engine: sa.Engine, outbox_schema: Outbox, store: Store
) -> None:
    write_events(pg_engine, outbox_schema, [Event(type="t", key="K") for _ in range(2)])
    c = claim(store)
    t, k = outbox_schema.events, outbox_schema.keys
    with pg_engine.begin() as conn:  # published meanwhile, as by a late confirm
        conn.execute(sa.update(t).where(t.c.seq == c.events[0].seq).values(status="published"))
    failure = Failure(event=c.events[0], error="unroutable", next_attempt_at=None)
    assert store.record_failures(c.token, [failure], relay="r", now=now()) == 0
    with pg_engine.connect() as conn:
        row = conn.execute(sa.select(k).where(k.c.key == "K")).one()
    assert not row.held and row.lease_token is None
    assert [e.seq for e in claim(store).events] == [c.events[1].seq]


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_one_write_records_the_results_of_several_claims_and_fences_each_on_its_own(
    database: str, pg_engine: sa.Engine, outbox_schema: Outbox, sqlite_url: str
) -> None:
    """Marks and frees of many claims go in one statement (one transaction) per batch; the
    fence still applies per pair (row, claim): the claim whose lease another relay took over
    writes nothing, the others all they own, and the counts say which."""
    if database == "sqlite":
        box = Outbox()
        engine = sa.create_engine(sqlite_url)
        box.create(engine)
    else:
        box, engine = outbox_schema, pg_engine
    store = Store(engine, box, db_timeout=10)
    write_events(engine, box, [Event(type="t", key=k) for k in ("a", "a", "b", "c")])
    past = now() - dt.timedelta(minutes=5)
    stale = store.claim(
        owner="frozen", limit=1, run_length=1, now=past, lease_until=past + dt.timedelta(seconds=30)
    )
    assert [e.key for e in stale.events] == ["a"]
    fresh = [claim(store, limit=2, run_length=1) for _ in range(2)]  # takes a over, then b, c
    held = {e.key: (c.token, e.seq) for c in fresh for e in c.events}
    assert set(held) == {"a", "b", "c"}
    acked = {c.token: [e.seq for e in c.events if e.key != "a"] for c in fresh}
    acked[stale.token] = [stale.events[0].seq]
    owned = store.mark_published(acked, now=now(), delete=False, relay="r")
    assert owned == 2  # b and c; the stale claim's row is the one the takeover holds
    freed = {
        c.token: {e.key for e in c.events if e.key is not None and e.key != "a"} for c in fresh
    }
    freed[stale.token] = {"a"}
    assert store.free_keys(freed, now=now()) == 2
    t, k = box.events, box.keys
    with engine.connect() as conn:
        status = dict(conn.execute(sa.select(t.c.seq, t.c.status)).all())
        keys = dict(conn.execute(sa.select(k.c.key, k.c.lease_token)).all())
    assert status[stale.events[0].seq] == "pending"
    assert status[held["b"][1]] == status[held["c"][1]] == "published"
    assert keys == {"a": held["a"][0]}  # a still leased by its taker; b and c drained, deleted
    if database == "sqlite":
        engine.dispose()


@pytest.mark.parametrize("delete", [False, True], ids=["mark", "delete"])
@pytest.mark.parametrize("shape", ["even, analyzed", "one huge key, not analyzed"])
def test_recording_confirms_reads_only_the_confirmed_rows_next_to_a_large_table(
    delete: bool, shape: str, pg_url: str, pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """20,000 pending rows, ten confirms of two claims: the one statement that records them
    (marked published, or deleted with --retention 0) finds its rows by primary key.

    * Statistics up to date, rows over 100 keys: joined only to the unnest of the (seq,
      token) pairs, whose size the planner cannot know (it guesses 10 rows), it hashed a
      scan of the whole table on every write: 3 ms at 20,000 rows instead of 0.2, growing
      with the backlog and the retention.
    * A burst ANALYZE has not seen yet, nearly all of one key: the planner walked the whole
      index of pending rows by key for `seq = ANY(...)`, its second column (14 ms per write
      with 30,000 rows)."""
    table = f'"{outbox_schema.schema}"."{outbox_schema.name}"'
    with pg_engine.begin() as conn:
        if shape == "even, analyzed":
            conn.exec_driver_sql(
                f"INSERT INTO {table} (id, type, key, routing_key, payload, occurred_at) "
                "SELECT gen_random_uuid(), 't', 'k' || (g %% 100), 't', '{}', now() "
                "FROM generate_series(1, 20000) AS g"
            )
            conn.exec_driver_sql(f"ANALYZE {table}")
        else:
            conn.exec_driver_sql(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
            conn.exec_driver_sql(
                f"INSERT INTO {table} (id, type, key, routing_key, payload, occurred_at) "
                "SELECT gen_random_uuid(), 't', CASE WHEN g <= 100 THEN 'k' || g "
                "ELSE 'huge' END, 't', '{}', now() FROM generate_series(1, 20000) AS g"
            )
    engine = create_engine(pg_url, application_name="outbox-relay:test", db_timeout=10)
    store = Store(engine, outbox_schema, db_timeout=10)
    claims = [claim(store, limit=5, run_length=1) for _ in range(2)]
    pairs = [(e.seq, c.token) for c in claims for e in c.events]
    parameters = {
        "seqs": [seq for seq, _ in pairs],
        "tokens": [token for _, token in pairs],
        "now": now(),
        "relay": "r",
    }
    statement = store._delete_published if delete else store._mark_published
    try:
        with engine.connect() as conn:
            compiled = statement.compile(conn)
            plan = "\n".join(
                row[0]
                for row in conn.exec_driver_sql(
                    f"EXPLAIN (ANALYZE, FORMAT TEXT) {compiled}",
                    compiled.construct_params(parameters),
                )
            )
            conn.rollback()
        owned = store.mark_published(
            {c.token: [e.seq for e in c.events] for c in claims}, now=now(), delete=delete
        )
    finally:
        engine.dispose()
    assert not re.search(r"Seq Scan on outbox\b", plan), plan
    assert f"{outbox_schema.name}_bykey_idx" not in plan, plan
    assert f"{outbox_schema.name}_pkey" in plan, plan
    if shape == "even, analyzed":
        assert "Bitmap" not in plan, plan
    assert owned == len(pairs) == 10


def test_a_claimed_event_carries_every_field_of_its_row(
    pg_engine: sa.Engine, outbox_schema: Outbox, store: Store
) -> None:
    """The claim builds events from its row's columns by position (CLAIMED_COLUMNS): each
    field must come from the column of its name, for keyed and keyless events, every
    optional field set or not, and a retried event's attempts."""
    write_events(
        pg_engine,
        outbox_schema,
        [
            Event(
                type="order.placed",
                key="k" * 255,
                aggregate_type="Order",
                aggregate_id="o-1",
                routing_key="orders.eu.placed",
                correlation_id="corr-ü",
                version=3,
                payload={"total": 1},
                headers={"tenant": "t1"},
            ),
            Event(type="audit.logged", key=None, payload={"n": 2}),
        ],
    )
    t = outbox_schema.events
    with pg_engine.begin() as conn:
        conn.execute(sa.update(t).where(t.c.key.is_(None)).values(attempts=2))
        rows = {row["seq"]: row for row in conn.execute(sa.select(t)).mappings()}

    claimed = claim(store)

    assert len(claimed.events) == 2
    for event in claimed.events:
        row = rows[event.seq]
        assert event == ClaimedEvent.from_row(row, claimed.token)
    assert {e.attempts for e in claimed.events} == {0, 2}


def test_an_occurred_at_without_a_zone_is_read_as_utc(
    pg_engine: sa.Engine, outbox_schema: Outbox, store: Store
) -> None:
    """A table made by hand with `timestamp` rather than `timestamptz` passes the schema
    check: its zone-less times are the writer's UTC, as on SQLite (a naive time made the
    message's timestamp local and the confirm's latency metric raise, stopping the relay)."""
    table = f'"{outbox_schema.schema}"."{outbox_schema.name}"'
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(
            f"ALTER TABLE {table} ALTER COLUMN occurred_at TYPE timestamp "
            "USING occurred_at AT TIME ZONE 'UTC'"
        )
    event = Event(type="t", key="k")
    write_events(pg_engine, outbox_schema, [event])

    (claimed,) = claim(store).events

    assert claimed.occurred_at.tzinfo is dt.UTC
    assert abs(claimed.occurred_at - event.occurred_at) < dt.timedelta(seconds=1)


def test_freeing_drained_keys_probes_each_key_after_a_burst_statistics_have_not_seen(
    pg_url: str, pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """Statistics from a quiet time (5,000 rows, all published), then a burst of 20,000
    pending rows nearly all of one key: the statement that deletes drained keys must probe
    each key's pending rows. Pulled up into an anti join, it walked the whole index of
    pending rows once per key (1.3 s per write for 100 keys; 14 s for 1,000)."""
    table = f'"{outbox_schema.schema}"."{outbox_schema.name}"'
    insert = (
        f"INSERT INTO {table} (id, type, key, routing_key, payload, occurred_at, status) "
        "SELECT gen_random_uuid(), 't', {key}, 't', '{{}}', now(), '{status}' "
        "FROM generate_series(1, {n}) AS g"
    )
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(insert.format(key="'k' || (g %% 100)", status="published", n=5000))
        conn.exec_driver_sql(f"ANALYZE {table}")
        conn.exec_driver_sql(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        conn.exec_driver_sql(insert.format(key="'huge'", status="pending", n=20000))
    keys = [f"k{i}" for i in range(100)]  # their rows came with their events (the trigger)
    engine = create_engine(pg_url, application_name="outbox-relay:test", db_timeout=10)
    store = Store(engine, outbox_schema, db_timeout=10)
    # Both shapes: keys as a parameter (`_drop_empty_keys`), and from the setting the
    # write's script leaves for its deletion.
    given = DriverStatement(store._delete_drained, engine.dialect)
    from_setting = DriverStatement(store._delete_drainable, engine.dialect)
    plans = []
    try:
        with engine.connect() as conn:
            driver = conn.connection.driver_connection
            assert driver is not None
            with driver.cursor() as cursor:
                for statement, values in ((given, {"keys": keys}), (from_setting, {})):
                    cursor.execute(
                        "SELECT set_config(%s, %s, true)",
                        (DRAINABLE_KEYS, "{" + ",".join(keys) + "}"),
                    )
                    cursor.execute(
                        "EXPLAIN (ANALYZE, FORMAT TEXT) " + statement.sql,
                        statement.parameters(values),
                    )
                    plans.append("\n".join(row[0] for row in cursor.fetchall()))
                    driver.rollback()
    finally:
        engine.dispose()
    for plan in plans:
        assert "Anti Join" not in plan, plan
        assert f"{outbox_schema.name}_bykey_idx" in plan, plan  # a probe per key, by index
        assert "rows=100 loops=1)" in plan.splitlines()[0], plan  # every key drained, deleted


def test_the_relays_prepared_statements_are_never_planned_without_their_values(
    pg_url: str, pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """psycopg, left to itself, prepares a statement used five times; PostgreSQL may then
    keep a generic plan, made without the values, which cannot use the index of pending rows
    (the status is a parameter) and, made while the table was small, seq-scanned it after a
    burst (and behind a pooler in transaction mode, the next transaction's server session
    does not have it: `test_pgbouncer.py`). The relay's sessions prepare nothing but the
    claim's read, which is written for its generic plan (its status is a literal, its keys
    come from a setting: see `test_the_claim_reads_only_what_it_returns_next_to_a_huge_key`);
    and should anything else be prepared, the sessions plan it with its values."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key=f"k{i % 5}") for i in range(40)])
    engine = create_engine(pg_url, application_name="outbox-relay:test", db_timeout=10)
    store = Store(engine, outbox_schema, db_timeout=10, keep_connections=True)
    plans: list[tuple[str, int, int]] = []
    settings: list[str] = []
    try:
        for _ in range(20):
            c = claim(store, limit=2, run_length=1)
            store.mark_published({c.token: [e.seq for e in c.events]}, now=now(), delete=False)
            store.end_runs({c.token: [e.key for e in c.events if e.key]}, now=now())
        for role in ("transactions", "autocommit"):
            conn = getattr(store._local, role, None)
            if conn is None:  # not used by these calls
                continue
            driver = conn.connection.driver_connection
            with driver.cursor() as cursor:
                cursor.execute(
                    "SELECT name, generic_plans, custom_plans FROM pg_prepared_statements"
                )
                plans += cursor.fetchall()
                cursor.execute("SHOW plan_cache_mode")
                settings.append(cursor.fetchone()[0])
            driver.rollback()
    finally:
        store.close()
        engine.dispose()
    read = store._claim_prepared.name
    assert plans == [(read, 20, 0)], plans
    assert settings and set(settings) == {"force_custom_plan"}


def test_statements_that_find_rows_by_seq_go_by_primary_key_after_an_unseen_burst(
    pg_url: str, pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """A burst nearly all of one key that ANALYZE has not seen: recording a failure,
    releasing a claim and renewing keyless leases find their rows by seq, and must not walk
    the index of pending rows by key for it (its second column)."""
    table = f'"{outbox_schema.schema}"."{outbox_schema.name}"'
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        conn.exec_driver_sql(
            f"INSERT INTO {table} (id, type, key, routing_key, payload, occurred_at) "
            "SELECT gen_random_uuid(), 't', CASE WHEN g <= 20 THEN 'k' || g "
            "WHEN g <= 40 THEN NULL ELSE 'huge' END, 't', '{}', now() "
            "FROM generate_series(1, 20000) AS g"
        )
    engine = create_engine(pg_url, application_name="outbox-relay:test", db_timeout=10)
    store = Store(engine, outbox_schema, db_timeout=10)
    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if f"{outbox_schema.name}.seq" in statement and statement.lstrip().startswith(
            ("UPDATE", "SELECT")
        ):
            seen.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        moment = now()
        first = claim(store, limit=40, run_length=1)
        small = [e for e in first.events if e.key != "huge"]
        store.renew(
            [first.token],
            moment + dt.timedelta(seconds=60),
            keyless=[e.seq for e in small if e.key is None],
        )
        failure = Failure(event=small[0], error="x", next_attempt_at=moment)
        store.record_failures(first.token, [failure], relay="r", now=moment)
        store.release(first.token, [e.seq for e in small[1:]], now=moment)
        sa.event.remove(engine, "before_cursor_execute", capture)
        plans = []
        with engine.connect() as conn:
            for statement, parameters in seen:
                rows = conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)
                plans.append("\n".join(row[0] for row in rows))
            conn.rollback()
    finally:
        engine.dispose()
    assert len(plans) >= 3, seen
    for (statement, _), plan in zip(seen, plans, strict=True):
        assert f"{outbox_schema.name}_bykey_idx" not in plan, f"{statement}\n{plan}"


def test_keys_with_any_characters_reach_the_read_through_the_setting(
    pg_engine: sa.Engine, outbox_schema: Outbox, store: Store
) -> None:
    """The locked keys go from the claim's first statement to its read as a text array in a
    setting: every key must come back as it was written, whatever its characters."""
    keys = [
        "a,b",
        '"quoted"',
        "{braces}",
        "NULL",
        "null",
        " spaced ",
        "back\\slash",
        "tab\t",
        "new\nline",
        "semi;colon",
        "'single'",
        "é" * 127 + "x",
        "$1",
        "%(now)s",
    ]
    write_events(pg_engine, outbox_schema, [Event(type="t", key=key) for key in keys])
    got = by_key(claim(store, limit=100))
    assert set(got) == set(keys)
    assert all(got[key] == pending_seqs(pg_engine, outbox_schema, key) for key in keys)


def test_a_session_that_lost_or_already_has_the_prepared_read_still_claims(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """The read is prepared once per session. psycopg deallocates every prepared statement
    of a session after a ROLLBACK or DROP it sees there, and another store of the same
    outbox may have prepared it on a pooled session: either way the claim goes on."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key=f"k{i}") for i in range(6)])
    engine = sa.create_engine(pg_engine.url, pool_size=1, max_overflow=0)
    first, second = (Store(engine, outbox_schema, db_timeout=10) for _ in range(2))
    try:
        assert len(claim(first, limit=2).events) == 2
        with engine.connect() as conn:  # the one pooled session
            conn.exec_driver_sql("DEALLOCATE ALL")
        assert len(claim(first, limit=2).events) == 2  # lost: prepared again
        assert len(claim(second, limit=2).events) == 2  # there already: used
        with engine.connect() as conn:
            names = conn.exec_driver_sql("SELECT name FROM pg_prepared_statements").scalars()
            assert list(names) == [first._claim_prepared.name]
    finally:
        engine.dispose()


def test_a_claim_of_thousands_of_long_keys_stays_within_the_statement_timeout(
    pg_url: str, pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """2,000 keys of 255 bytes in one claim: the read takes its keys from the setting once
    per claim. An expression of the setting inside each key's read parsed the whole array
    (512 KB) once per key in the generic plan: 36 s, far past any statement timeout."""
    keys = [f"{i:05d}" + "é" * 125 for i in range(2000)]  # 255 bytes each
    write_events(pg_engine, outbox_schema, [Event(type="t", key=key) for key in keys])
    engine = create_engine(pg_url, application_name="t", db_timeout=5)
    store = Store(engine, outbox_schema, db_timeout=5)
    try:
        got = claim(store, limit=2000, run_length=1)
    finally:
        engine.dispose()
    assert sorted(e.key for e in got.events) == sorted(keys)


def session_plan(store: Store, *, limit: int, run_length: int) -> str:
    """EXPLAIN ANALYZE of the claim's read on the store's own kept session, with the plan
    that session keeps (the claim's settings and lock first, then rolled back)."""
    read = store._claim_prepared
    lock = store._driver_statements["_lock_claim_keys"]
    moment = now()
    given = {
        "token": uuid.uuid4(),
        "owner": "t",
        "limit": limit,
        "keyless_limit": max(1, limit // 2),
        "run_length": run_length,
        "lease_until": moment + dt.timedelta(seconds=30),
        "now": moment,
    }
    script = psycopg.ClientCursor(store._local.autocommit.connection.driver_connection)
    script.execute("BEGIN")
    try:
        for _, text in store._claim_script(read)[:-1]:
            script.execute(text, lock.parameters(given))
        script.execute("EXPLAIN (ANALYZE, FORMAT TEXT) " + read.execute_sql, read.parameters(given))
        return "\n".join(row[0] for row in script.fetchall())
    finally:
        script.execute("ROLLBACK")


def test_a_generic_plan_made_while_the_table_was_small_still_reads_by_index_after_a_burst(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """The relay's session prepares the read (and makes its generic plan) while the table
    has three rows; then 20,000 events of one key and 200 small keys arrive before any
    ANALYZE (autovacuum off for these tables stands for "not yet"). The plan the session
    keeps must still read each key by the index of pending rows: one made with sequential
    scans allowed seq-scanned the table once per key (2 s per claim). Found by review."""
    table = f'"{outbox_schema.schema}"."{outbox_schema.name}"'
    keys_table = f'"{outbox_schema.schema}"."{outbox_schema.name}_key"'
    with pg_engine.begin() as conn:
        for name in (table, keys_table):
            conn.exec_driver_sql(f"ALTER TABLE {name} SET (autovacuum_enabled = false)")
    write_events(pg_engine, outbox_schema, [Event(type="t", key=f"s{i}") for i in range(3)])
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(f"ANALYZE {table}")
        conn.exec_driver_sql(f"ANALYZE {keys_table}")
    store = Store(pg_engine, outbox_schema, db_timeout=10, keep_connections=True)
    try:
        for _ in range(3):
            c = claim(store, limit=100, run_length=50)
            store.mark_published({c.token: [e.seq for e in c.events]}, now=now(), delete=False)
            store.end_runs({c.token: [e.key for e in c.events if e.key]}, now=now())
        with pg_engine.begin() as conn:
            conn.exec_driver_sql(
                f"INSERT INTO {table} (id, type, key, routing_key, payload, occurred_at) "
                "SELECT gen_random_uuid(), 't', 'busy', 't', '{}', now() "
                "FROM generate_series(1, 20000)"
            )
        write_events(pg_engine, outbox_schema, [Event(type="t", key=f"k{i}") for i in range(200)])
        plan = session_plan(store, limit=2000, run_length=50)
        got = by_key(claim(store, limit=2000, run_length=50))
    finally:
        store.close()
    assert not re.search(r"Seq Scan on \S*outbox ", plan), plan
    # Nor a join that walks every key row per claimed key (its plan for the lease of the
    # keys, made with three key rows, did: found by review).
    removed = [int(n) for n in re.findall(r"Rows Removed by (?:Join )?Filter: (\d+)", plan)]
    assert max(removed, default=0) < 100, plan
    assert len(got) == 201 and len(got["busy"]) <= 50


def test_a_pooler_that_loses_the_prepared_read_turns_claims_to_sending_it(
    pg_engine: sa.Engine, outbox_schema: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """Behind a pooler in transaction mode the session that prepared the read is not the
    one the next claim runs on. Stood for here by deallocating every prepared statement
    before each claim's script: the claim prepares again once, and when the read is missing
    a second time the store sends the read itself from then on, saying so once."""
    write_events(pg_engine, outbox_schema, [Event(type="t", key=f"k{i}") for i in range(6)])
    store = Store(pg_engine, outbox_schema, db_timeout=10, keep_connections=True)
    scripts: list[str] = []

    def pooled(conn: Any, sql: str) -> None:
        if "outbox_relay.claim_keys" in sql and "PREPARE" not in sql:
            scripts.append(sql)
            conn.execute("DEALLOCATE ALL")

    store.statement_observers.append(pooled)
    try:
        with caplog.at_level(logging.WARNING, logger="relay.store"):
            got = [len(claim(store, limit=2).events) for _ in range(3)]
    finally:
        store.close()
    assert got == [2, 2, 2]
    assert [("EXECUTE" in sql) for sql in scripts] == [True, True, False, False, False]
    assert caplog.text.count("did not stay on the database session") == 1


def test_the_keyless_lease_reads_only_keyless_rows_past_a_published_history(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """4,000 published keyed rows kept for retention, then 300 pending events without a
    key, statistics fresh. The generic plan cannot see the lease's limit nor `now`, and
    walked the table in seq order past every published row to find the keyless ones
    (found by review); the lease now asks for an order only the pending index gives."""
    table = f'"{outbox_schema.schema}"."{outbox_schema.name}"'
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(
            f"INSERT INTO {table} (id, type, key, routing_key, payload, occurred_at, status) "
            "SELECT gen_random_uuid(), 't', 'p' || (i %% 10), 't', '{}', now(), 'published' "
            "FROM generate_series(1, 4000) AS i"
        )
        conn.execute(sa.delete(outbox_schema.keys))  # drained keys, as the relay leaves them
    write_events(pg_engine, outbox_schema, [Event(type="t") for _ in range(300)])
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(f"ANALYZE {table}")
    store = Store(pg_engine, outbox_schema, db_timeout=10, keep_connections=True)
    try:
        first = claim(store, limit=20, run_length=5)  # the session makes its plan here
        plan = session_plan(store, limit=20, run_length=5)
    finally:
        store.close()
    assert len(first.events) == 10 and all(e.key is None for e in first.events)
    removed = [int(n) for n in re.findall(r"Rows Removed by (?:Join )?Filter: (\d+)", plan)]
    assert max(removed, default=0) < 100, plan
