"""A claim that carries a write of confirms (`Store.write_and_claim`): the marks and ends of
runs first, then the claim, in one transaction (one round trip on PostgreSQL).

Each test checks one assumption of the argument in the method's docstring: a key the write
frees is claimable by the same claim, what the write confirmed is never read again, the
fence still holds per claim, and a failure anywhere leaves nothing written.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa

from outbox import Event, Outbox
from relay.records import Claim
from relay.store import Carried, Store, Written
from tests.integration.test_store_claim import by_key, claim, kill_head, now
from tests.support.relays import write_events


def write_and_claim(
    store: Store, carried: Carried, *, limit: int = 100, run_length: int = 10
) -> tuple[Written, Claim]:
    moment = now()
    return store.write_and_claim(
        carried,
        owner="r",
        limit=limit,
        run_length=run_length,
        lease_until=moment + dt.timedelta(seconds=30),
        now=moment,
    )


def confirms(c: Claim, *, delete: bool = False) -> Carried:
    """Every event of `c` confirmed, and every key's run ended."""
    return Carried(
        {c.token: [e.seq for e in c.events]},
        {c.token: {e.key for e in c.events if e.key is not None}},
        delete,
        "r",
    )


def statuses(engine: sa.Engine, box: Outbox) -> dict[int, str]:
    t = box.events
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(t.c.seq, t.c.status)).all())


def key_leases(engine: sa.Engine, box: Outbox) -> dict[str, Any]:
    k = box.keys
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(k.c.key, k.c.lease_token)).all())


def test_a_key_the_write_frees_is_claimed_again_by_the_same_claim(
    setup: tuple[Store, sa.Engine, Outbox],
) -> None:
    """The end of a's run and the claim of a's next rows in one call: the claim sees the key
    free (this transaction freed it) and never the rows this transaction confirmed."""
    store, engine, box = setup
    write_events(engine, box, [Event(type="t", key="a") for _ in range(3)])
    first = claim(store, run_length=1)
    assert [e.key for e in first.events] == ["a"] and first.unfinished == {"a"}
    pending = sorted(seq for seq, status in statuses(engine, box).items() if status == "pending")
    written, second = write_and_claim(store, confirms(first), run_length=1)
    assert written.owned == 1
    assert written.freed.ended == 1 and written.freed.kept == 1  # a has rows left
    assert [e.seq for e in second.events] == [pending[1]]
    assert statuses(engine, box)[first.events[0].seq] == "published"
    assert key_leases(engine, box) == {"a": second.token}


def test_a_drained_key_is_deleted_and_the_claim_goes_on_with_the_others(
    setup: tuple[Store, sa.Engine, Outbox],
) -> None:
    store, engine, box = setup
    write_events(engine, box, [Event(type="t", key="a")])
    first = claim(store)
    assert first.unfinished == frozenset()  # a was drained as the claim saw it
    write_events(engine, box, [Event(type="t", key="b"), Event(type="t", key="b")])
    written, second = write_and_claim(store, confirms(first))
    assert written == Written(1, written.freed) and written.freed.ended == 1
    assert written.freed.kept == 0  # a drained: deleted
    assert [e.key for e in second.events] == ["b", "b"]
    assert key_leases(engine, box) == {"b": second.token}


def test_confirms_of_a_claim_taken_over_are_fenced_and_the_claim_goes_on(
    setup: tuple[Store, sa.Engine, Outbox],
) -> None:
    store, engine, box = setup
    write_events(engine, box, [Event(type="t", key="a")])
    past = now() - dt.timedelta(minutes=5)
    stale = store.claim(
        owner="frozen", limit=1, run_length=1, now=past, lease_until=past + dt.timedelta(seconds=30)
    )
    assert [e.key for e in stale.events] == ["a"]
    taker = claim(store, limit=1, run_length=1, owner="taker")  # a's lease ran out: taken over
    assert [e.key for e in taker.events] == ["a"]
    write_events(engine, box, [Event(type="t", key="b")])
    written, got = write_and_claim(store, confirms(stale))
    assert written.owned == 0 and written.freed.ended == 0  # nothing of a is the stale claim's
    assert [e.key for e in got.events] == ["b"]
    assert statuses(engine, box)[stale.events[0].seq] == "pending"
    assert key_leases(engine, box) == {"a": taker.token, "b": got.token}


def test_a_failing_claim_rolls_back_the_write_it_carries(
    setup: tuple[Store, sa.Engine, Outbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing marked, nothing freed, nothing leased: the results go back to the relay, and
    marking them again later must not read as fenced."""
    store, engine, box = setup
    write_events(engine, box, [Event(type="t", key="a"), Event(type="t", key="a")])
    first = claim(store, run_length=1)
    before_statuses, before_keys = statuses(engine, box), key_leases(engine, box)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the claim's read failed")

    # The claim's read fails after the write's statements have run in its transaction.
    if store.engine.dialect.name == "postgresql":
        real = store._claim_script

        def failing_script(read: Any) -> list[tuple[str, str]]:
            return [*real(read), ("boom", "SELECT 1 / 0")]

        monkeypatch.setattr(store, "_claim_script", failing_script)
    else:
        monkeypatch.setattr(store, "_claim_sqlite", broken)
    with pytest.raises(Exception):  # noqa: B017 (the driver's or our own, either way)
        write_and_claim(store, confirms(first), run_length=1)
    assert statuses(engine, box) == before_statuses
    assert key_leases(engine, box) == before_keys
    monkeypatch.undo()
    written, again = write_and_claim(store, confirms(first), run_length=1)
    assert written.owned == 1 and len(again.events) == 1


def test_on_postgresql_the_write_and_the_claim_are_one_round_trip(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    store = Store(pg_engine, outbox_schema, db_timeout=10)
    write_events(pg_engine, outbox_schema, [Event(type="t", key=k) for k in "aab"])
    first = claim(store, run_length=1)  # prepares the claim's read on the session
    sent: list[str] = []
    store.statement_observers.append(lambda conn, statement: sent.append(statement))
    transactions = store.transactions_total
    written, second = write_and_claim(store, confirms(first), run_length=1)
    assert written.owned == 2 and len(second.events) == 1
    assert len(sent) == 1 and store.transactions_total == transactions + 1


def test_names_that_need_quoting_and_keys_a_text_array_must_quote(
    pg_engine: sa.Engine, quoted_outbox: Outbox
) -> None:
    box = quoted_outbox
    store = Store(pg_engine, box, db_timeout=10)
    keys = ['a,"b"', "{c}", "é" * 127 + "x"]  # the last one 255 bytes of UTF-8
    write_events(pg_engine, box, [Event(type="t", key=k) for k in keys for _ in range(2)])
    first = claim(store, run_length=1)
    assert {e.key for e in first.events} == set(keys)
    written, second = write_and_claim(store, confirms(first, delete=True), run_length=1)
    assert written.owned == 3 and written.freed.kept == 3
    assert {e.key for e in second.events} == set(keys)
    assert len(statuses(pg_engine, box)) == 3  # the confirmed rows deleted


def test_a_carrying_claim_serves_small_keys_beside_a_huge_one_and_past_a_held_one(
    pg_engine: sa.Engine, outbox_schema: Outbox
) -> None:
    """The claim a write carries is the claim alone: a key with a dead head (held) in front
    of a backlog, and a key with thousands of events, take no turn from the small keys."""
    store = Store(pg_engine, outbox_schema, db_timeout=10)
    write_events(pg_engine, outbox_schema, [Event(type="t", key="held") for _ in range(500)])
    kill_head(store, "held")
    write_events(pg_engine, outbox_schema, [Event(type="t", key="huge") for _ in range(3000)])
    first = claim(store, limit=20, run_length=10)
    assert by_key(first).keys() == {"huge"} and first.unfinished == {"huge"}
    small = [f"s{i}" for i in range(5)]
    write_events(pg_engine, outbox_schema, [Event(type="t", key=k) for k in small])
    written, second = write_and_claim(store, confirms(first), limit=20, run_length=10)
    assert written.owned == 10 and written.freed.kept == 1  # huge has thousands left
    got = by_key(second)
    assert set(small) <= got.keys() and "held" not in got
    assert len(got["huge"]) <= 10  # its run, then the back of the line
