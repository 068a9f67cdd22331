"""One event per key in flight; a stopped key gives back the rest of its run."""

from __future__ import annotations

import datetime as dt
import random
import uuid

import pytest

from relay.records import ClaimedEvent
from relay.sequencer import Sequencer

TOKEN = uuid.uuid4()


def ev(seq: int, key: str | None, token: uuid.UUID = TOKEN) -> ClaimedEvent:
    return ClaimedEvent(
        seq=seq,
        id=uuid.uuid4(),
        type="t",
        key=key,
        aggregate_type=None,
        aggregate_id=None,
        routing_key="t",
        correlation_id=None,
        version=1,
        payload="{}",
        headers=None,
        occurred_at=dt.datetime.now(dt.UTC),
        attempts=0,
        token=token,
    )


def seqs(events: list[ClaimedEvent]) -> list[int]:
    return [e.seq for e in events]


def test_one_event_per_key_in_flight_and_keyless_are_free() -> None:
    s = Sequencer(max_in_flight=100)
    s.add([ev(1, "a"), ev(2, "a"), ev(3, "b"), ev(4, None), ev(5, None), ev(6, "a")])
    assert sorted(seqs(s.take())) == [1, 3, 4, 5]
    assert s.take() == []
    s.confirmed(1)
    assert seqs(s.take()) == [2]
    s.confirmed(2)
    s.confirmed(3)
    assert seqs(s.take()) == [6]
    for seq in (4, 5, 6):
        s.confirmed(seq)
    assert s.idle


def test_in_flight_limit() -> None:
    s = Sequencer(max_in_flight=2)
    s.add([ev(1, "a"), ev(2, "b"), ev(3, "c")])
    assert len(s.take()) == 2
    assert s.take() == []
    s.confirmed(1)
    assert seqs(s.take()) == [3]


def test_stopped_event_withdraws_the_rest_of_its_key_only() -> None:
    s = Sequencer(max_in_flight=100)
    s.add([ev(1, "a"), ev(2, "a"), ev(3, "a"), ev(4, "b"), ev(5, "b")])
    s.take()
    event, rest = s.stopped(1)
    assert event is not None and event.seq == 1
    assert seqs(rest) == [2, 3]
    s.confirmed(4)
    assert seqs(s.take()) == [5]
    s.confirmed(5)
    assert s.idle


def test_withdraw_one_claim_keeps_the_others() -> None:
    other = uuid.uuid4()
    s = Sequencer(max_in_flight=100)
    s.add([ev(1, "a"), ev(2, "a"), ev(3, "b", other), ev(4, "b", other), ev(5, None, other)])
    assert sorted(seqs(s.take())) == [1, 3, 5]
    assert sorted(seqs(s.withdraw(other))) == [4]
    assert s.tokens() == {TOKEN, other}  # 3 and 5 still in flight
    s.confirmed(1)
    assert seqs(s.take()) == [2]
    assert seqs(s.withdraw()) == []


def test_out_of_order_add_is_a_bug() -> None:
    s = Sequencer(max_in_flight=10)
    s.add([ev(2, "a"), ev(3, "a")])
    with pytest.raises(ValueError, match="out of order"):
        s.add([ev(1, "a")])


def test_a_claim_of_a_key_still_queued_under_an_older_lease_replaces_the_stale_run() -> None:
    """A claim can return a key this relay still holds under an expired lease (a lost
    commit, a clock step): the old run is dropped, not a crash, and order holds."""
    old, new = uuid.uuid4(), uuid.uuid4()
    seq = Sequencer(max_in_flight=10)
    seq.add([ev(1, "a", old), ev(2, "a", old), ev(3, "a", old)])
    (first,) = seq.take()
    assert first.seq == 1
    stale = seq.add([ev(1, "a", new), ev(2, "a", new)])
    assert [(e.seq, e.token) for e in stale] == [(2, old), (3, old)]
    assert seq.take() == []  # the old event 1 is still in flight: one per key
    seq.confirmed(1)
    taken = seq.take()
    assert [(e.seq, e.token) for e in taken] == [(1, new)]
    seq.confirmed(1)
    assert [(e.seq, e.token) for e in seq.take()] == [(2, new)]


def test_a_window_per_key_hands_out_up_to_n_of_a_key_in_order_round_robin() -> None:
    s = Sequencer(max_in_flight=100, per_key=3)
    s.add([ev(1, "a"), ev(2, "a"), ev(3, "a"), ev(4, "a"), ev(5, "b")])
    assert seqs(s.take()) == [1, 5, 2, 3]  # a, b, then a's window fills at the back
    assert s.take() == [] and s.busy("a", TOKEN) and s.queued == 1
    assert s.confirmed(2) is not None  # any settled event of the window makes room
    assert seqs(s.take()) == [4]
    for seq in (1, 3, 4):
        s.confirmed(seq)
    assert not s.busy("a") and s.idle is False  # b still in flight
    s.confirmed(5)
    assert s.idle


def test_a_refused_event_of_a_window_withdraws_the_queue_and_leaves_the_rest_in_flight() -> None:
    s = Sequencer(max_in_flight=100, per_key=2)
    s.add([ev(1, "a"), ev(2, "a"), ev(3, "a"), ev(4, "a")])
    assert seqs(s.take()) == [1, 2]
    event, rest = s.stopped(1)
    assert event is not None and seqs(rest) == [3, 4]
    assert s.busy("a", TOKEN) and s.in_flight == 1  # 2 was sent: its outcome still comes
    assert s.take() == []
    assert s.confirmed(2) is not None and not s.busy("a") and s.idle


def test_a_windows_new_claim_waits_for_the_old_claims_events_to_settle() -> None:
    old, new = uuid.uuid4(), uuid.uuid4()
    s = Sequencer(max_in_flight=100, per_key=4)
    s.add([ev(1, "a", old), ev(2, "a", old)])
    assert seqs(s.take()) == [1, 2]
    stale = s.add([ev(3, "a", new), ev(4, "a", new)])  # the old lease ran out meanwhile
    assert stale == []
    assert s.take() == []  # room in the window, but not for another claim's events
    s.confirmed(1)
    assert s.take() == []
    s.confirmed(2)
    assert seqs(s.take()) == [3, 4]


@pytest.mark.parametrize("per_key", [0, -1])
def test_a_window_has_at_least_one_event(per_key: int) -> None:
    with pytest.raises(ValueError, match="per_key"):
        Sequencer(max_in_flight=10, per_key=per_key)


def _drop(queued: dict[int, ClaimedEvent], events: list[ClaimedEvent]) -> None:
    for e in events:
        assert queued.pop(e.seq) is e


@pytest.mark.parametrize("per_key", [1, 2, 3])
def test_random_operations_keep_the_queued_count_and_the_windows_true(per_key: int) -> None:
    """Random adds (stale replacements included), takes, confirms, stops and withdrawals,
    checked after every operation against a model kept outside the sequencer: `queued` is
    the number of events added and not yet handed out, dropped or given back; a key has at
    most `per_key` events in flight, all of one claim, handed out in the order they were
    added; and `take()` hands out something whenever a queued event may go out."""
    rng = random.Random(20261201 + per_key)
    for _ in range(300):
        s = Sequencer(max_in_flight=rng.choice([1, 2, 5, 100]), per_key=per_key)
        queued: dict[int, ClaimedEvent] = {}  # the model: seq -> event still queued
        in_flight: dict[int, ClaimedEvent] = {}
        tokens: list[uuid.UUID] = []
        last_out: dict[tuple[str, uuid.UUID], int] = {}
        next_seq = 0

        for _ in range(40):
            op = rng.choice(["add", "add", "take", "take", "confirm", "stop", "withdraw"])
            if op == "add":
                token = uuid.uuid4()
                tokens.append(token)
                batch = []
                for _ in range(rng.randint(1, 5)):
                    next_seq += 1
                    batch.append(ev(next_seq, rng.choice(["a", "b", "c", None]), token))
                queued.update((e.seq, e) for e in batch)
                _drop(queued, s.add(batch))
            elif op == "take":
                for e in s.take(rng.choice([None, 1, 2])):
                    assert queued.pop(e.seq) is e
                    in_flight[e.seq] = e
                    if e.key is not None:
                        assert last_out.get((e.key, e.token), 0) < e.seq  # in write order
                        last_out[(e.key, e.token)] = e.seq
            elif op in ("confirm", "stop") and in_flight:
                seq = rng.choice(sorted(in_flight))
                event = in_flight.pop(seq)
                if op == "confirm":
                    assert s.confirmed(seq) is event
                else:
                    stopped, rest = s.stopped(seq)
                    assert stopped is event
                    _drop(queued, rest)
            elif op == "withdraw":
                _drop(queued, s.withdraw(rng.choice([None, *tokens[-3:]])))
            assert s.queued == len(queued)
            assert s.in_flight == len(in_flight)
            assert s.idle == (not queued and not in_flight)
            windows: dict[str, list[ClaimedEvent]] = {}
            for e in in_flight.values():
                if e.key is not None:
                    windows.setdefault(e.key, []).append(e)
            for key, window in windows.items():
                assert len(window) <= per_key and len({e.token for e in window}) == 1
                assert s.busy(key, window[0].token)
            for key in ("a", "b", "c"):
                assert s.busy(key) == (key in windows)
                assert s.has_queued(key) == any(e.key == key for e in queued.values())
        # Liveness: whatever may go out does, and everything ends.
        while queued or in_flight:
            for e in s.take():
                queued.pop(e.seq)
                in_flight[e.seq] = e
            assert in_flight, "events are queued but none may go out"
            for seq in list(in_flight):
                s.confirmed(seq)
                del in_flight[seq]
            assert s.queued == len(queued)
        assert s.idle
