"""The relay loop's two small state machines: when to claim next, and the database lane."""

from __future__ import annotations

import random

import pytest

from relay.claim_pacing import MIN_POLL, ClaimPacer
from relay.database_lane import DatabaseHealth, DatabaseLane
from relay.errors import DatabaseUnavailableError
from relay.metrics import Metrics
from relay.worker import InlineWorker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_empty_claims_back_off_to_the_poll_interval_and_a_wake_resets_it() -> None:
    clock = Clock()
    pacer = ClaimPacer(clock, poll_interval=1.0)
    waits = []
    for _ in range(10):
        assert pacer.due
        ticket = pacer.started()
        assert not pacer.due  # nothing else goes out while it runs
        pacer.finished(ticket, count=0, full=False)
        waits.append(round(pacer.next_at - clock.now, 3))
        clock.now = pacer.next_at
    assert waits[:3] == [2 * MIN_POLL, 4 * MIN_POLL, 8 * MIN_POLL]
    assert waits[-1] == 1.0 and pacer.last_was_empty
    pacer.wake()
    assert pacer.due
    ticket = pacer.started()
    pacer.finished(ticket, count=0, full=False)
    assert pacer.next_at - clock.now == pytest.approx(2 * MIN_POLL)


def test_a_wake_during_a_claim_or_a_full_claim_claims_again_at_once() -> None:
    clock = Clock()
    pacer = ClaimPacer(clock, poll_interval=1.0)
    ticket = pacer.started()
    pacer.wake()  # a NOTIFY while the claim runs: its events may not be in it
    pacer.finished(ticket, count=3, full=False)
    assert pacer.due
    ticket = pacer.started()
    pacer.finished(ticket, count=100, full=True)
    assert pacer.due and not pacer.last_was_empty


def test_the_lane_runs_one_job_goes_down_with_backoff_and_reports_other_errors() -> None:
    clock = Clock()
    fatal: list[BaseException] = []
    lane = DatabaseLane(
        InlineWorker(),
        monotonic=clock,
        rng=random.Random(1),
        health=DatabaseHealth(Metrics()),
        on_fatal=fatal.append,
    )
    results: list[object] = []
    lane.submit(lambda: 42, results.append)
    assert results == [42] and lane.open

    def outage() -> None:
        raise DatabaseUnavailableError("database unavailable: gone")

    put_back: list[bool] = []
    lane.submit(outage, results.append, on_error=lambda: put_back.append(True))
    assert put_back == [True] and lane.down and not lane.open and lane.failures == 1
    clock.now = lane.retry_at
    assert lane.open
    lane.submit(lambda: "ok", results.append)
    assert results == [42, "ok"] and lane.failures == 0

    def bug() -> None:
        raise RuntimeError("bug")

    lane.submit(bug, results.append)
    assert [str(e) for e in fatal] == ["bug"] and lane.open
