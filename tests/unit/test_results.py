"""Results waiting to be written: when they are due, and nothing lost when a write fails."""

from __future__ import annotations

import uuid

from relay.records import Failure
from relay.results import FLUSH_INTERVAL, PendingResults

from .test_sequencer import TOKEN, ev


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_confirms_wait_for_the_interval_or_a_full_batch() -> None:
    clock = Clock()
    results = PendingResults(clock, batch_size=3)
    assert not results.due(stopping=False) and results.due_at() is None
    results.confirmed(ev(1, "a"), run_finished=False, drained=True)
    assert not results.due(stopping=False)
    assert results.due_at() == 100.0 + FLUSH_INTERVAL
    assert results.due(stopping=True)  # a stopping relay writes at once
    clock.now += FLUSH_INTERVAL * 1.01
    assert results.due(stopping=False)
    clock.now = 100.0
    results.confirmed(ev(2, "b"), run_finished=False, drained=True)
    results.confirmed(ev(3, "c"), run_finished=False, drained=True)
    assert results.due(stopping=False)  # a batch's worth


def test_failures_give_backs_and_runs_whose_keys_may_have_more_are_due_at_once() -> None:
    for record in (
        lambda r: r.failed(Failure(event=ev(1, "a"), error="no", next_attempt_at=None)),
        lambda r: r.give_back([ev(1, "a")]),
        lambda r: r.confirmed(ev(1, "a"), run_finished=True, drained=False),
    ):
        results = PendingResults(Clock(), batch_size=100)
        record(results)
        assert results.due(stopping=False)
        assert results.take().urgent  # and stay so when a failed write puts them back


def test_a_run_that_drained_its_key_waits_for_a_claim_to_carry_it_or_the_interval() -> None:
    clock = Clock()
    results = PendingResults(clock, batch_size=100)
    results.confirmed(ev(1, "a"), run_finished=True, drained=True)
    assert not results.due(stopping=False)
    batch = results.take_carriable()
    assert batch is not None and batch.freed == {TOKEN: {"a"}} and not results
    results.put_back(batch)  # the claim failed
    assert not results.due(stopping=False)
    clock.now += FLUSH_INTERVAL * 1.01
    assert results.due(stopping=False)  # no claim came: written alone


def test_only_confirms_and_finished_runs_go_with_a_claim() -> None:
    for record in (
        lambda r: r.failed(Failure(event=ev(1, "a"), error="no", next_attempt_at=None)),
        lambda r: r.give_back([ev(1, None)]),  # a row lease to release
    ):
        results = PendingResults(Clock(), batch_size=100)
        results.confirmed(ev(2, "b"), run_finished=True, drained=True)
        record(results)
        assert results.take_carriable() is None and results
    assert PendingResults(Clock(), batch_size=100).take_carriable() is None


def test_a_failed_write_puts_its_rest_back_in_front() -> None:
    other = uuid.uuid4()
    results = PendingResults(Clock(), batch_size=100)
    results.confirmed(ev(1, "a"), run_finished=True, drained=True)
    results.give_back([ev(2, "a"), ev(7, "b", other), ev(8, None, other)])
    batch = results.take()
    assert not results and batch.gives_keys_back
    results.confirmed(ev(3, "c"), run_finished=False, drained=True)  # arrives while the write runs
    results.put_back(batch)
    again = results.take()
    assert again.urgent  # the give-back in it
    assert again.acked == {TOKEN: [1, 3]}
    assert again.releases == {other: [8]}  # only events without a key have row leases
    assert again.freed == {TOKEN: {"a"}, other: {"b"}}
    assert results.tokens() == set()


def test_a_given_back_event_frees_its_key_unless_its_claim_still_has_it_in_flight() -> None:
    older = uuid.uuid4()
    results = PendingResults(Clock(), batch_size=100)
    in_flight = {"b": TOKEN, "c": older}  # c's event in flight is of an older claim
    results.give_back(
        [ev(2, "a"), ev(5, "b"), ev(7, "c")],
        busy=lambda key, token: in_flight.get(key) == token,
    )
    assert results.take().freed == {TOKEN: {"a", "c"}}


def test_a_confirm_frees_its_key_only_when_the_run_is_finished() -> None:
    results = PendingResults(Clock(), batch_size=100)
    results.confirmed(ev(1, "a"), run_finished=False, drained=True)
    results.confirmed(ev(2, "b"), run_finished=True, drained=True)
    batch = results.take()
    assert batch.freed == {TOKEN: {"b"}}
    assert batch.acked == {TOKEN: [1, 2]}
