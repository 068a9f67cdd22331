"""Fencing on PostgreSQL: a relay whose lease ran out (paused, partitioned, slow) and was taken
over cannot change its successor's rows with any of its late result writes.

Why this holds: every result write (`mark_published`, `mark_and_end_runs`, `record_failures`,
`release`) and the
renewal name the claim token they act for, and a takeover claims the rows under a new token,
so the old token matches no row any more. Each test here loses a lease the way production
does (another relay claims once the lease has expired, by the clock passed to `claim`), makes
one late write with the old token, and then checks through the store's own methods and the
rows' outcomes that the successor's claim is whole: the late write changed nothing, the
successor still holds every row (renewal), no third relay can claim them, and the successor's
own writes land.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from outbox import Event, Outbox
from relay.records import Claim, Failure
from relay.store import Store
from tests.faults.invariants import RowState, row_states
from tests.support.relays import write_events

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
LEASE = dt.timedelta(seconds=30)


def _claim(store: Store, owner: str, at: dt.datetime) -> Claim:
    return store.claim(
        owner=owner,
        limit=10,
        run_length=10,
        lease_until=at + LEASE,
        now=at,
    )


LateWrite = Callable[[Store, Claim], int]

LATE_WRITES: dict[str, LateWrite] = {
    "mark_published": lambda store, old: store.mark_published(
        {old.token: [e.seq for e in old.events]}, now=NOW, delete=False
    ),
    "mark_published_and_delete": lambda store, old: store.mark_published(
        {old.token: [e.seq for e in old.events]}, now=NOW, delete=True
    ),
    # What a batch of confirms writes (one script): the marks, and the runs they finished.
    "mark_and_end_runs": lambda store, old: store.mark_and_end_runs(
        {old.token: [e.seq for e in old.events]},
        {old.token: {e.key for e in old.events if e.key is not None}},
        now=NOW,
        delete=False,
    )[0],
    "record_failures_dead": lambda store, old: store.record_failures(
        old.token,
        [Failure(event=e, error="late", next_attempt_at=None) for e in old.events],
        relay="lost",
        now=NOW,
    ),
    "record_failures_retry": lambda store, old: store.record_failures(
        old.token,
        [Failure(event=e, error="late", next_attempt_at=NOW) for e in old.events],
        relay="lost",
        now=NOW,
    ),
    "release": lambda store, old: store.release(old.token, [e.seq for e in old.events]),
}


@pytest.mark.parametrize("write", list(LATE_WRITES))
def test_a_lost_lease_cannot_overwrite_its_successor(
    pg_engine: sa.Engine, outbox_schema: Outbox, write: str
) -> None:
    store = Store(pg_engine, outbox_schema, db_timeout=10)
    events = [Event(type="t", key="k", payload={"n": n}) for n in range(4)]
    write_events(pg_engine, outbox_schema, [*events, Event(type="t", key=None)])
    ids = [str(e.id) for e in events]

    # Given: the lost relay's claim, taken over after its lease ran out.
    lost = _claim(store, "lost", NOW)
    assert len(lost.events) == 5
    later = NOW + LEASE + dt.timedelta(seconds=1)
    successor = _claim(store, "successor", later)
    assert [e.seq for e in successor.events] == [e.seq for e in lost.events]

    # When: the lost relay writes late.
    changed = LATE_WRITES[write](store, lost)

    # Then: nothing changed, and the successor's claim is whole.
    assert changed == 0, f"a late {write} with a lost lease changed {changed} rows"
    states = row_states(pg_engine, outbox_schema)
    assert {states[i] for i in ids} == {RowState("pending", 0, 0)}
    assert store.renew([lost.token], later + LEASE) == set()
    assert store.renew([successor.token], later + LEASE) == {successor.token}
    third = _claim(store, "third", later + dt.timedelta(seconds=1))
    assert third.events == (), "rows the successor holds were claimable again"
    # The successor's own writes land: two published, one retrying, and the fourth goes
    # back with its key (a failure ends the key's lease: the rest of the run waits behind it).
    head, second, third_row, fourth = (e for e in successor.events if e.key == "k")
    assert store.mark_published({successor.token: [head.seq, second.seq]}, now=later, delete=False)
    retry = Failure(event=third_row, error="refused", next_attempt_at=later)
    assert store.record_failures(successor.token, [retry], relay="successor", now=later) == 1
    assert store.release(successor.token, [fourth.seq]) == 0  # the key is no longer leased
    states = row_states(pg_engine, outbox_schema)
    assert [states[i] for i in ids] == [
        RowState("published", 0, 0),
        RowState("published", 0, 0),
        RowState("pending", 1, 1),
        RowState("pending", 0, 0),
    ]
    # And a second late write, after the successor's, still changes nothing.
    assert LATE_WRITES[write](store, lost) == 0
    assert row_states(pg_engine, outbox_schema) == states
