"""One event per key in flight; a stopped key gives back the rest of its run."""

from __future__ import annotations

import datetime as dt
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
