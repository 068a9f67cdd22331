"""Claims on the relay loop's own thread (`Relay._quiet_enough_for_a_claim_here`), step by
step: when they run there and when on the claim lane, their deadline, the connection the lane
opens for them, and what happens when one fails."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy.engine import Connection

from relay.errors import DatabaseUnavailableError
from relay.messages import Outcome
from relay.relay import HEARTBEAT_EVERY, HERE_DEADLINE, HERE_PAUSE
from relay.store import Store

from .test_relay_loop import Harness, ManualWorker, _turn, keyed, write_alone


class HereStore(Store):
    """SQLite has no watchdog, so claims never run on the loop's thread: this store says
    they can, while `connected`, and records the deadlines it was given."""

    connected = True
    opened = 0
    refuse_connections = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadlines: list[float] = []
        self.calls: list[tuple[str, bool]] = []  # (what, under a deadline of its own)
        self._within: list[float] = []

    @property
    def claims_here_supported(self) -> bool:
        return True

    def claims_here_possible(self) -> bool:
        return self.connected

    def keeps_claim_connections(self) -> bool:
        return self.connected

    def open_claim_connections(self) -> list[Connection]:
        self.opened += 1
        if self.refuse_connections:
            raise DatabaseUnavailableError("too many connections for role (test)")
        return [cast(Connection, object()), cast(Connection, object())]

    def adopt_claim_connections(self, conns: Sequence[Connection]) -> None:
        self.connected = True

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        self.deadlines.append(seconds)
        self._within.append(seconds)
        try:
            yield
        finally:
            self._within.pop()

    def _recorded(self, what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        """A call of the relay's (not one this store makes of itself: `claim` is a
        `write_and_claim` without a write)."""
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth == 1:
                self.calls.append((what, bool(self._within)))
            return call(*args, **kwargs)
        finally:
            self._depth -= 1

    def claim(self, **kwargs: Any) -> Any:
        return self._recorded("claim", super().claim, **kwargs)

    def write_and_claim(self, *args: Any, **kwargs: Any) -> Any:
        return self._recorded("write_and_claim", super().write_and_claim, *args, **kwargs)

    def claim_then_write(self, *args: Any, **kwargs: Any) -> Any:
        return self._recorded("claim_then_write", super().claim_then_write, *args, **kwargs)


def here_harness(tmp_path: Path, **overrides: Any) -> Harness:
    return Harness(
        tmp_path, worker=ManualWorker, store_type=HereStore, claims_here=True, **overrides
    )


def started(h: Harness) -> tuple[ManualWorker, ManualWorker, HereStore]:
    """The relay's database lanes (results, claims) once it has sent its first heartbeat."""
    writes, claims, _ = workers(h)
    h.step()
    _turn(h, writes)  # the first heartbeat
    assert isinstance(h.store, HereStore)
    return writes, claims, h.store


def workers(h: Harness) -> tuple[ManualWorker, ManualWorker, ManualWorker]:
    """Results and housekeeping, claims, and the opening of the loop's claim connections."""
    writes, claims, opener = h.workers
    assert isinstance(writes, ManualWorker) and isinstance(claims, ManualWorker)
    assert isinstance(opener, ManualWorker)
    return writes, claims, opener


def commit_and_notify(h: Harness, key: str) -> None:
    """An event of `key` committed, its NOTIFY taken: the step that may claim it."""
    h.write(*keyed(key, 1))
    h.relay.wake()
    h.step()


def published_keys(h: Harness) -> list[Any]:
    return [m.headers["ordering-key"] for m in h.publisher.published]


def test_a_claim_with_nothing_else_going_on_runs_here_and_its_events_are_flushed(
    tmp_path: Path,
) -> None:
    """Nothing on the claim lane: the claim ran in the step, under its own deadline, and its
    event is published and pushed out (`Publisher.flush`) in that same step."""
    h = here_harness(tmp_path)
    _, claims, store = started(h)
    commit_and_notify(h, "a")
    assert not claims.jobs
    assert published_keys(h) == ["a"]
    assert h.publisher.flushes and h.publisher.flushes[-1] == 1
    assert store.calls[-1] == ("claim", True)
    assert set(store.deadlines) == {HERE_DEADLINE}


def test_the_deadline_of_a_claim_here_is_a_tenth_of_a_short_lease(tmp_path: Path) -> None:
    h = here_harness(tmp_path, lease=3.0)
    _, _, store = started(h)
    commit_and_notify(h, "a")
    assert store.deadlines and all(d == pytest.approx(0.3) for d in store.deadlines)


def confirm_and_claim(h: Harness, key: str) -> None:
    """Settle what is published (its write then waits for a claim to carry it), then write
    an event of `key` and let its NOTIFY bring the claim."""
    h.publisher.settle()
    h.step()
    commit_and_notify(h, key)


def test_claims_that_carry_a_write_run_here_and_answer_before_it(tmp_path: Path) -> None:
    """a1's confirm waits for a claim to carry it; b1's claim carries it, writing first (as
    the first carrying claim does); c1's claim carries b1's after its own commit: c1 is
    published and flushed from inside the claim's answer. Both in the step they went out."""
    h = here_harness(tmp_path)
    _, claims, store = started(h)
    commit_and_notify(h, "a")
    confirm_and_claim(h, "b")
    assert store.calls[-1] == ("write_and_claim", True)
    assert published_keys(h) == ["a", "b"]
    confirm_and_claim(h, "c")
    assert store.calls[-1] == ("claim_then_write", True)
    assert not claims.jobs
    assert published_keys(h) == ["a", "b", "c"]
    assert h.publisher.flushes[-2:] == [3, 3]  # from the answer, then after the job
    assert [r.status for r in h.rows()] == ["published", "published", "pending"]


def test_with_an_event_in_flight_a_claim_goes_on_the_lane(tmp_path: Path) -> None:
    """a1 is unconfirmed: the loop has confirms to take, so b1's claim goes on the lane."""
    h = here_harness(tmp_path)
    _, claims, store = started(h)
    commit_and_notify(h, "a")
    commit_and_notify(h, "b")
    assert claims.jobs, "the claim went on the lane"
    _turn(h, claims)
    assert store.calls[-1] == ("claim", False)
    assert published_keys(h) == ["a", "b"]


def test_with_a_write_on_its_way_a_claim_goes_on_the_lane(tmp_path: Path) -> None:
    h = here_harness(tmp_path)
    writes, claims, _ = started(h)
    commit_and_notify(h, "a")
    h.publisher.settle()
    write_alone(h)  # a1's write goes out alone, and is not answered yet
    assert writes.jobs
    commit_and_notify(h, "b")
    assert claims.jobs, "the claim went on the lane"


def test_without_connections_claims_go_on_the_lane_and_a_worker_opens_them_when_quiet(
    tmp_path: Path,
) -> None:
    """No connections for claims here: a1's claim goes on the lane, and the opener makes
    them off the loop (one opening at a time); the claims after that run here."""
    h = here_harness(tmp_path)
    writes, claims, store = started(h)
    opener = workers(h)[2]
    store.connected = False
    commit_and_notify(h, "a")
    assert claims.jobs and opener.jobs and store.opened == 0
    h.step()
    assert len(opener.jobs) == 1, "one at a time"
    _turn(h, claims)
    assert published_keys(h) == ["a"]
    _turn(h, opener)
    assert store.opened == 1 and store.connected
    h.publisher.settle()
    write_alone(h)
    _turn(h, writes)
    _turn(h, claims)  # the claim after a write that freed a key finds nothing
    commit_and_notify(h, "b")
    assert not claims.jobs and published_keys(h) == ["a", "b"]


def test_connections_that_cannot_be_opened_are_tried_again_after_a_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = here_harness(tmp_path)
    _, _, store = started(h)
    opener = workers(h)[2]
    store.connected = False
    store.refuse_connections = True
    h.step()
    _turn(h, opener)
    assert store.opened == 1
    assert "could not open the connections for claims" in caplog.text
    for _ in range(5):
        h.step()
    assert not opener.jobs, "backing off"
    h.clock.advance(61)
    h.step()
    assert opener.jobs
    assert h.relay._claim_lane.failures == 0 and h.relay._database.failures == 0


def test_a_claim_here_that_fails_sends_claims_to_the_lane_for_a_while_without_an_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelled at its deadline (or the database unreachable): a warning, the claim goes
    out again at once on the lane, and claims stay there for `HERE_PAUSE`; the database is
    not taken for down (the lane's claim finds that out, with the full timeout)."""
    h = here_harness(tmp_path)
    writes, claims, store = started(h)
    real_claim = store.claim
    failing = [True]

    def claim(**kwargs: Any) -> Any:
        if failing and store._within:
            failing.clear()
            raise DatabaseUnavailableError("canceling statement due to user request (test)")
        return real_claim(**kwargs)

    store.claim = claim  # type: ignore[method-assign]
    commit_and_notify(h, "a")
    assert "claims go on the claim thread for the next 30 s" in caplog.text
    assert h.relay._claim_lane.failures == 0 and not h.relay._claim_lane.down
    assert not h.publisher.published
    h.step()
    assert claims.jobs, "claimed again at once, on the lane"
    _turn(h, claims)
    assert published_keys(h) == ["a"]
    h.publisher.settle()
    write_alone(h)
    _turn(h, writes)
    commit_and_notify(h, "b")
    assert claims.jobs, "still on the lane"
    _turn(h, claims)
    h.publisher.settle()
    write_alone(h)
    _turn(h, writes)
    h.clock.advance(HERE_PAUSE)
    _turn(h, writes)  # the renewal and heartbeat due by then
    _turn(h, claims)  # the claims after the writes find nothing
    commit_and_notify(h, "c")
    assert not claims.jobs and published_keys(h) == ["a", "b", "c"]


def test_an_error_of_the_relays_own_in_an_answer_here_is_fatal_and_the_write_still_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raised inside the store's reading of the script, it would leave the write's outcome
    unknown: it is the relay's fatal error instead (as on the lane, where the loop raises
    it), and the carried write is still recorded."""
    h = here_harness(tmp_path)
    _, _, store = started(h)
    commit_and_notify(h, "a")
    confirm_and_claim(h, "b")  # writes first: the next carrying claim answers early
    h.publisher.settle()
    h.step()
    h.write(*keyed("c", 1))
    h.relay.wake()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug in taking a claim (test)")

    monkeypatch.setattr(h.relay, "_claimed", broken)
    h.step()  # the claim here: its answer fails
    assert store.calls[-1] == ("claim_then_write", True)
    assert [r.status for r in h.rows()] == ["published", "published", "pending"]
    with pytest.raises(RuntimeError, match="a bug in taking a claim"):
        h.step()


def test_with_results_waiting_that_no_claim_carries_a_claim_goes_on_the_lane(
    tmp_path: Path,
) -> None:
    """a1 is refused while the write lane is busy (a heartbeat): its failure waits (no claim
    carries a failure), so b1's claim goes on the lane."""
    h = here_harness(tmp_path)
    writes, claims, store = started(h)
    h.clock.advance(HEARTBEAT_EVERY)
    h.step()
    assert writes.jobs, "the write lane is busy"
    commit_and_notify(h, "a")
    assert published_keys(h) == ["a"] and not claims.jobs
    calls = len(store.calls)
    h.publisher.decide = lambda m: Outcome.REJECTED
    h.publisher.settle()
    h.step()
    assert h.relay._results, "the failure waits"
    commit_and_notify(h, "b")
    assert claims.jobs and len(store.calls) == calls, "the claim went on the lane"


def test_a_claim_here_that_left_a_connection_pauses_claims_here_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It answered, but its cancel went out as it did (the store left the connection): the
    next claims go on the lane for a while rather than reopen connections claim by claim."""
    h = here_harness(tmp_path)
    _, claims, store = started(h)
    real_claim = store.claim

    def claim(**kwargs: Any) -> Any:
        answer = real_claim(**kwargs)
        store.connected = False
        return answer

    store.claim = claim  # type: ignore[method-assign]
    commit_and_notify(h, "a")
    assert published_keys(h) == ["a"] and not claims.jobs
    assert "a claim on the relay's loop lost a connection" in caplog.text
    store.claim = real_claim  # type: ignore[method-assign]
    store.connected = True  # whatever the opener would make: claims stay on the lane
    h.publisher.settle()
    write_alone(h)
    _turn(h, workers(h)[0])
    _turn(h, claims)
    commit_and_notify(h, "b")
    assert claims.jobs, "on the lane for a while"
