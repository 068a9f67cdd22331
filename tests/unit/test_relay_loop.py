"""The relay loop, step by step: a real (SQLite) store, a scripted publisher, a fake clock."""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import re
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

import outbox
from outbox import Event, Outbox
from relay.errors import DatabaseUnavailableError
from relay.messages import Outcome, OutgoingMessage
from relay.records import Claim
from relay.relay import Relay
from relay.results import FLUSH_INTERVAL
from relay.settings import RelaySettings
from relay.store import FreedKeys, Store
from relay.worker import Completion, Done, InlineWorker, Worker

from .fakes import FakePublisher

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider


class Clock:
    def __init__(self) -> None:
        self.wall = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        self.mono = 1000.0
        self.tick = 0.0  # advance on every reading (lets bounded waits run out)

    def now(self) -> dt.datetime:
        return self.wall

    def monotonic(self) -> float:
        self.advance(self.tick)
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += dt.timedelta(seconds=seconds)
        self.mono += seconds


class Harness:
    def __init__(
        self,
        tmp_path: Path,
        worker: Callable[[Callable[[Completion], None]], object] | None = None,
        tracer_provider: TracerProvider | None = None,
        store_type: type[Store] = Store,
        claims_here: bool = False,
        **overrides: object,
    ) -> None:
        self.engine = sa.create_engine(f"sqlite:///{tmp_path}/relay.db")
        self.box = Outbox()
        self.box.create(self.engine)
        self.clock = Clock()
        settings = RelaySettings(
            database_url=str(self.engine.url),
            amqp_url="amqp://guest:guest@localhost/",
            name="relay-1",
            **overrides,  # type: ignore[arg-type]
        )
        self.store = store_type(self.engine, self.box, db_timeout=5)
        self._worker_factory = worker or (lambda post: InlineWorker())
        self.worker: object = None  # the last one made: the claim lane's
        self.workers: list[object] = []
        self.relay = Relay(
            settings,
            self.store,
            FakePublisher,
            clock=self.clock.now,
            monotonic=self.clock.monotonic,
            rng=random.Random(1),
            worker_factory=self._make_worker,
            tracer_provider=tracer_provider,
            claims_here=claims_here,
        )
        self.publisher: FakePublisher = self.relay.publisher  # type: ignore[assignment]
        self.relay.start()

    def _make_worker(self, post: Callable[[Completion], None]) -> Worker:
        # The relay makes two: its lane for results and housekeeping, then its claim lane.
        self.worker = self._worker_factory(post)
        self.workers.append(self.worker)
        return self.worker  # type: ignore[return-value]

    def write(self, *events: Event) -> None:
        with self.engine.begin() as conn:
            outbox.write(conn, *events, outbox=self.box)

    def step(self, times: int = 1) -> None:
        for _ in range(times):
            self.relay.run_once(timeout=0)

    def settle_and_step(self, rounds: int = 50) -> None:
        """Step and settle every publish, then let the batch interval run out, so that
        results waiting for a claim to carry them are written too."""
        for _ in range(rounds):
            self.step()
            self.publisher.settle()
        self.step()
        self.clock.advance(2 * FLUSH_INTERVAL)
        self.step()

    def rows(self) -> list[sa.Row[tuple[object, ...]]]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(self.box.events).order_by("seq")))

    def key_rows(self) -> list[sa.Row[tuple[object, ...]]]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(self.box.keys).order_by("key")))

    def leased_keys(self) -> list[object]:
        return [k.key for k in self.key_rows() if k.lease_token is not None]

    def failures(self) -> list[sa.Row[tuple[object, ...]]]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(self.box.failures).order_by("id")))


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path, max_attempts=3, retry_min=10, retry_max=60)
    yield harness
    harness.engine.dispose()


def keyed(key: str, n: int, type_: str = "order.placed") -> list[Event]:
    return [Event(type=type_, key=key, payload={"n": i}) for i in range(n)]


def let_writes_go(h: Harness) -> None:
    """Confirms of runs that drained their keys wait for a claim to carry them, at most the
    batch interval (`relay.results`): let it run out, so that the next step writes them on
    the write lane, alone."""
    h.clock.advance(2 * FLUSH_INTERVAL)


def write_alone(h: Harness) -> None:
    """Take the confirms in, then let the batch interval run out: the step after writes
    them on the write lane, alone."""
    h.step()
    let_writes_go(h)
    h.step()


def test_publishes_every_event_in_key_order_and_marks_it_published(h: Harness) -> None:
    events = [e for pair in zip(keyed("a", 5), keyed("b", 5), strict=True) for e in pair]
    h.write(*events, Event(type="no.key"))
    h.settle_and_step()
    by_key: dict[str | None, list[str]] = {}
    for m in h.publisher.published:
        by_key.setdefault(m.headers["ordering-key"], []).append(m.message_id)
    assert by_key["a"] == [str(e.id) for e in events if e.key == "a"]
    assert by_key["b"] == [str(e.id) for e in events if e.key == "b"]
    assert len(h.publisher.published) == 11
    assert {r.status for r in h.rows()} == {"published"}
    assert all(r.claim_token is None for r in h.rows())
    assert h.key_rows() == []  # drained keys are removed


def test_message_carries_dedup_id_and_envelope(h: Harness) -> None:
    event = Event(
        type="order.placed",
        aggregate_type="order",
        aggregate_id=7,
        payload={"total": "9.99"},
        headers={"tenant": "acme"},  # names the relay sets are refused by Event itself
        correlation_id="req-9",
        version=3,
    )
    h.write(event)
    h.settle_and_step()
    (m,) = h.publisher.published
    assert isinstance(m, OutgoingMessage)
    assert m.message_id == str(event.id)
    assert m.type == "order.placed"
    assert m.routing_key == "order.placed"
    assert m.correlation_id == "req-9"
    assert m.content_type == "application/json"
    assert json.loads(m.body) == {"total": "9.99"}
    assert m.timestamp == int(event.occurred_at.timestamp())
    assert m.headers["tenant"] == "acme"
    assert m.headers["ordering-key"] == "order:7"  # the relay's header wins
    assert m.headers["aggregate-type"] == "order"
    assert m.headers["aggregate-id"] == "7"
    assert m.headers["event-version"] == 3


def test_rejection_backs_off_holds_the_key_and_lets_other_keys_flow(h: Harness) -> None:
    h.write(*keyed("a", 3), *keyed("b", 3))
    first_a = h.rows()[0]
    h.publisher.decide = lambda m: (
        Outcome.REJECTED if m.message_id == str(first_a.id) else Outcome.CONFIRMED
    )
    h.settle_and_step()
    rows = {r.seq: r for r in h.rows()}
    a_rows = [r for r in rows.values() if r.key == "a"]
    assert [r.status for r in a_rows] == ["pending", "pending", "pending"]
    assert a_rows[0].attempts == 1 and a_rows[0].last_error == "no"
    assert a_rows[0].next_attempt_at is not None
    assert a_rows[1].attempts == 0  # held back, not attempted
    assert all(r.status == "published" for r in rows.values() if r.key == "b")
    published_a = [m for m in h.publisher.published if m.headers["ordering-key"] == "a"]
    assert [m.message_id for m in published_a] == [str(first_a.id)]
    # Backoff: nothing happens before the retry time (retry_min=10s, jittered in [5, 10]s).
    h.publisher.decide = lambda m: Outcome.CONFIRMED
    h.clock.advance(4)
    h.settle_and_step()
    assert len([m for m in h.publisher.published if m.headers["ordering-key"] == "a"]) == 1
    h.clock.advance(7)
    h.relay.wake()
    h.settle_and_step()
    published_a = [m.message_id for m in h.publisher.published if m.headers["ordering-key"] == "a"]
    assert published_a == [str(first_a.id)] + [str(r.id) for r in a_rows]
    assert {r.status for r in h.rows()} == {"published"}
    assert [(f.event_id, f.attempt, f.error) for f in h.failures()] == [(first_a.id, 1, "no")]


def test_dead_after_max_attempts_and_dead_letter_holds_its_key(h: Harness) -> None:
    h.write(*keyed("a", 2, type_="unroutable"), *keyed("b", 1))
    h.publisher.decide = lambda m: (
        Outcome.REJECTED if m.headers["ordering-key"] == "a" else Outcome.CONFIRMED
    )
    for _ in range(3):
        h.settle_and_step()
        h.clock.advance(120)
        h.relay.wake()
    rows = h.rows()
    assert [r.status for r in rows] == ["dead", "pending", "published"]
    assert rows[0].attempts == 3
    assert [f.attempt for f in h.failures()] == [1, 2, 3]
    h.clock.advance(600)
    h.relay.wake()
    h.settle_and_step()
    assert h.rows()[1].status == "pending" and h.rows()[1].attempts == 0


@pytest.mark.parametrize("headers", ["[]", "null", '"text"'])
def test_a_row_no_message_can_be_made_of_is_dead_and_the_relay_goes_on(
    h: Harness, headers: str
) -> None:
    """A row written around the writer whose headers text is JSON but not an object: it is
    dead at once, saying why, its key held like any dead letter's; other keys flow and the
    relay keeps running (it raised in its loop on every claim of the row, a crash loop)."""
    h.write(*keyed("a", 2), *keyed("b", 2))
    bad = h.rows()[0]
    with h.engine.begin() as conn:
        t = h.box.events
        conn.execute(sa.update(t).where(t.c.seq == bad.seq).values(headers=headers))
    h.settle_and_step()
    rows = {r.seq: r for r in h.rows()}
    assert rows[bad.seq].status == "dead" and rows[bad.seq].attempts == 1
    assert "cannot build the message" in (rows[bad.seq].last_error or "")
    assert [r.status for r in rows.values() if r.key == "a"] == ["dead", "pending"]
    assert all(r.status == "published" for r in rows.values() if r.key == "b")
    assert str(bad.id) not in {m.message_id for m in h.publisher.published}


def test_an_unbuildable_head_of_a_window_sends_nothing_of_its_key_past_it(
    tmp_path: Path,
) -> None:
    """With a window of 3 per key, the rest of the window behind an event no message can be
    made of is not sent (the key is held by the dead head); other keys flow."""
    h = Harness(tmp_path, max_attempts=3, max_in_flight_per_key=3)
    h.write(*keyed("a", 3), *keyed("b", 2))
    head = h.rows()[0]
    with h.engine.begin() as conn:
        t = h.box.events
        conn.execute(sa.update(t).where(t.c.seq == head.seq).values(headers="[]"))
    h.settle_and_step()
    rows = [r for r in h.rows() if r.key == "a"]
    assert [r.status for r in rows] == ["dead", "pending", "pending"]
    assert [r.attempts for r in rows] == [1, 0, 0]
    assert not [m for m in h.publisher.published if m.headers["ordering-key"] == "a"]
    assert all(r.status == "published" for r in h.rows() if r.key == "b")
    h.engine.dispose()


def test_dead_letter_can_let_its_key_continue(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_attempts=1, dead_letters_hold_key=False)
    h.write(*keyed("a", 2))
    first = h.rows()[0]
    h.publisher.decide = lambda m: (
        Outcome.REJECTED if m.message_id == str(first.id) else Outcome.CONFIRMED
    )
    h.settle_and_step()
    h.relay.wake()
    h.settle_and_step()
    assert [r.status for r in h.rows()] == ["dead", "published"]


def test_broker_loss_gives_rows_back_without_spending_attempts(h: Harness) -> None:
    h.write(*keyed("a", 3), *keyed("b", 3))
    h.step()  # claimed, heads published, nothing confirmed yet
    assert len(h.publisher.outstanding) == 2
    h.publisher.go_down()
    h.step()
    assert h.leased_keys() == []
    assert all(r.attempts == 0 for r in h.rows())
    h.publisher.come_up()
    h.settle_and_step()
    assert {r.status for r in h.rows()} == {"published"}
    ids = [m.message_id for m in h.publisher.published]
    assert len(ids) == 8  # the two in flight went out twice, with the same message_id
    assert len(set(ids)) == 6


def failing_marks(h: Harness, times: int) -> dict[str, int]:
    """The store's next `times` writes that mark published rows (alone, with the runs they
    end, or carried by a claim) fail as an outage would; the returned count says how many
    failures are left."""
    calls = {"failing": times}

    def failing(real: Callable[..., Any]) -> Callable[..., Any]:
        def flaky(*args: object, **kwargs: object) -> Any:
            if calls["failing"]:
                calls["failing"] -= 1
                raise DatabaseUnavailableError("database unavailable: connection refused")
            return real(*args, **kwargs)

        return flaky

    h.store.mark_published = failing(h.store.mark_published)  # type: ignore[method-assign]
    h.store.mark_and_end_runs = failing(h.store.mark_and_end_runs)  # type: ignore[method-assign]
    h.store.write_and_claim = failing(h.store.write_and_claim)  # type: ignore[method-assign]
    return calls


def claimed_then_taken_over(h: Harness) -> Claim:
    """The relay claims and publishes one event of "a"; then another relay takes the key
    over (as when our lease expired while we were paused)."""
    h.write(*keyed("a", 1))
    h.step()
    with h.engine.begin() as conn:
        conn.execute(sa.update(h.box.keys).values(available_at=h.clock.now()))
    other = Store(h.engine, h.box, db_timeout=5)
    takeover = other.claim(
        owner="relay-2",
        limit=10,
        run_length=10,
        now=h.clock.now(),
        lease_until=h.clock.now() + dt.timedelta(seconds=30),
    )
    assert len(takeover.events) == 1
    return takeover


def test_results_of_a_lost_lease_are_fenced_off(h: Harness) -> None:
    takeover = claimed_then_taken_over(h)
    h.publisher.settle()
    h.step()
    let_writes_go(h)
    report = h.relay.run_once(timeout=0)
    assert report.fenced == 1
    (row,) = h.rows()
    (key,) = h.key_rows()
    assert row.status == "pending" and key.lease_token == takeover.token


def test_results_fenced_off_by_the_final_write_at_stop_are_reported(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A relay resumed past its lease whose first result write fails (its database call was
    cut while it was frozen) and that is stopped right away records its results in its final
    write at shutdown: those fenced off there are reported like any others (found by the
    SIGSTOP fault test, which then saw none)."""
    claimed_then_taken_over(h)
    calls = failing_marks(h, 1)
    h.publisher.settle()
    h.step()
    let_writes_go(h)
    h.relay.run_once(timeout=0)  # the write fails: the database is down, results kept
    assert calls["failing"] == 0
    h.relay.request_stop()
    with caplog.at_level(logging.WARNING, logger="relay"):
        h.relay.shutdown()
    assert "1 results were not recorded: the lease had passed to another relay" in caplog.text
    (row,) = h.rows()
    assert row.status == "pending"


def test_paused_relay_stops_publishing_a_claim_whose_lease_ran_out(h: Harness) -> None:
    h.write(*keyed("a", 3))
    h.step()
    assert len(h.publisher.published) == 1
    h.clock.advance(31)  # paused past the 30 s lease, no renewal happened
    # Meanwhile another relay took the rows over.
    takeover = Store(h.engine, h.box, db_timeout=5).claim(
        owner="relay-2",
        limit=10,
        run_length=10,
        now=h.clock.now(),
        lease_until=h.clock.now() + dt.timedelta(seconds=30),
    )
    assert len(takeover.events) == 3
    h.publisher.settle()
    h.step(3)
    assert len(h.publisher.published) == 1  # the rest of our run was not published
    assert {key.lease_token for key in h.key_rows()} == {takeover.token}


def test_leases_are_renewed_while_a_claim_is_worked_on(h: Harness) -> None:
    h.write(*keyed("a", 2))
    h.step()
    before = h.key_rows()[0].available_at
    h.clock.advance(11)  # past lease/3
    h.step()
    assert h.key_rows()[0].available_at > before
    h.clock.advance(25)  # 36 s after the claim: alive thanks to the renewal
    h.publisher.settle()
    h.step(2)
    assert len(h.publisher.published) == 2


def test_until_empty_run_returns(tmp_path: Path) -> None:
    h = Harness(tmp_path, until_empty=True)
    h.clock.tick = 0.001  # the batch interval runs out
    h.publisher.auto_settle = True
    h.write(*keyed("a", 20))
    h.relay.run()
    assert {r.status for r in h.rows()} == {"published"}
    assert h.publisher.stopped


def test_graceful_stop_records_confirms_and_gives_back_the_rest(h: Harness) -> None:
    h.write(*keyed("a", 3), *keyed("b", 3))
    h.step()
    h.relay.request_stop()
    h.publisher.settle()
    h.relay.shutdown()
    statuses = [r.status for r in h.rows()]
    assert statuses.count("published") == 2
    assert h.leased_keys() == []


def test_retention_zero_deletes_published_rows(tmp_path: Path) -> None:
    h = Harness(tmp_path, retention=0)
    h.write(*keyed("a", 3))
    h.settle_and_step()
    assert h.rows() == []
    assert len(h.publisher.published) == 3


def test_published_rows_are_purged_after_retention(tmp_path: Path) -> None:
    h = Harness(tmp_path, retention=3600)
    h.write(*keyed("a", 3))
    h.settle_and_step()
    assert len(h.rows()) == 3
    h.clock.advance(3601 + 30)
    h.step()
    assert h.rows() == []


def test_database_outage_keeps_results_and_writes_them_once_it_is_back(h: Harness) -> None:
    h.write(*keyed("a", 2), *keyed("b", 2))
    calls = failing_marks(h, 3)
    h.step()
    h.publisher.settle()  # a1 and b1 confirmed; writing them fails for a while
    for _ in range(5):
        h.step()
        h.clock.advance(10)  # past the flush interval, then past each outage backoff
    h.settle_and_step()
    assert calls["failing"] == 0
    assert {r.status for r in h.rows()} == {"published"}
    assert len(h.publisher.published) == 4  # nothing was published twice meanwhile


def test_unexpected_database_error_stops_the_relay_loudly(h: Harness) -> None:
    h.write(*keyed("a", 1))

    def broken(**kwargs: object) -> None:
        raise RuntimeError("bug")

    h.store.claim = broken  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="bug"):
        h.step(2)


def test_stop_with_unconfirmed_events_gives_everything_back(h: Harness) -> None:
    h.write(*keyed("a", 3), *keyed("b", 3))
    h.step()
    assert len(h.publisher.outstanding) == 2  # never confirmed
    h.relay.request_stop()
    h.clock.tick = 0.5  # the drain waits (bounded) for confirms that never come
    h.relay.shutdown()
    rows = h.rows()
    assert all(r.status == "pending" for r in rows)
    assert h.leased_keys() == []
    assert all(r.attempts == 0 for r in rows)


def test_an_idle_relay_does_not_hammer_the_database(h: Harness) -> None:
    calls = {"claim": 0, "has_ready": 0}
    for name in calls:
        real = getattr(h.store, name)

        def counted(*args: object, _real: object = real, _name: str = name, **kw: object) -> object:
            calls[_name] += 1
            return _real(*args, **kw)  # type: ignore[operator]

        setattr(h.store, name, counted)
    for _ in range(600):  # one simulated minute, in steps of 0.1 s
        h.step()
        h.clock.advance(0.1)
    # Polls back off to poll_interval (1 s); after the first empty claim each is one probe.
    assert calls["claim"] <= 2
    assert calls["has_ready"] <= 70
    h.write(*keyed("a", 1))  # and it still notices new events at the next poll
    h.clock.advance(1.1)
    h.settle_and_step()
    assert {r.status for r in h.rows()} == {"published"}


class ManualWorker:
    """Runs jobs and hands their completions back only when the test says so."""

    def __init__(self, post: Callable[[Completion], None]) -> None:
        self.post = post
        self.jobs: list[tuple[Callable[[], object], Done]] = []
        self.finished: list[Completion] = []

    def submit(self, job: Callable[[], object], done: Done) -> None:
        self.jobs.append((job, done))

    def run_jobs(self) -> None:
        while self.jobs:
            job, done = self.jobs.pop(0)
            self.finished.append(Completion(done, job(), None))

    def deliver(self) -> None:
        while self.finished:
            self.post(self.finished.pop(0))

    def stop(self, timeout: float) -> None:
        pass


def _turn(h: Harness, worker: ManualWorker) -> None:
    """Run the worker's jobs, failing as the store fails, and hand their answers back."""
    while worker.jobs:
        job, done = worker.jobs.pop(0)
        try:
            worker.finished.append(Completion(done, job(), None))
        except Exception as exc:
            worker.finished.append(Completion(done, None, exc))
    worker.deliver()
    h.step()


def test_notify_during_a_claim_is_not_lost_to_the_poll_backoff(tmp_path: Path) -> None:
    h = Harness(tmp_path, worker=ManualWorker, poll_interval=30.0)
    worker: ManualWorker = h.worker  # type: ignore[assignment]
    for _ in range(8):  # idle: the poll backs off towards 30 s
        h.step()
        worker.run_jobs()
        worker.deliver()
        h.step()
        h.clock.advance(3)
    h.relay.wake()
    h.step()  # a claim is submitted...
    worker.run_jobs()  # ...and runs before the next commit
    h.write(*keyed("a", 1))
    h.relay.wake()  # that commit's NOTIFY arrives before the claim's answer
    worker.deliver()
    for _ in range(3):  # no clock advance: only an immediate re-claim finds the event
        h.step()
        worker.run_jobs()
        worker.deliver()
    assert len(h.publisher.published) == 1


def test_a_replacing_claim_given_back_behind_an_in_flight_event_frees_its_key(
    h: Harness,
) -> None:
    """1. Claim T1 takes key a (a1, a2, a3); a1 is published and stays in flight.
    2. Key a's lease runs out in the database while the relay still holds it (the case
       Sequencer.add handles): the relay's next claim T2 returns a1..a3 again, T2's run
       replaces T1's queued events and waits behind the in-flight a1 (still T1's).
    3. The broker connection drops: T2's queued run is withdrawn and given back, but key a is
       busy (a1 in flight), so it is not freed; a1 then comes back UNKNOWN and frees key a
       under T1 -- a no-op, the key is T2's.
    Key a must not stay leased by T2 once this relay holds nothing of it (found by review)."""
    h.write(*(Event(type="t", key="a", payload={"n": i}) for i in range(3)))
    h.step()
    assert [m.headers["outbox-seq"] for m in h.publisher.published] == [1]  # a1 in flight
    (t1,) = {k.lease_token for k in h.key_rows()}
    with h.engine.begin() as conn:  # the database considers T1's lease over
        conn.execute(sa.update(h.box.keys).values(available_at=h.clock.now()))
    h.relay.wake()
    h.step()
    (t2,) = {k.lease_token for k in h.key_rows()}
    assert t2 != t1 and h.relay.sequencer.queued == 3  # T2's run queued behind a1
    h.publisher.go_down()
    h.step(3)
    assert h.relay.sequencer.idle
    assert h.leased_keys() == [], (
        f"key a still leased by {t2} (T1 was {t1}) with nothing of it held by the relay"
    )


def test_the_debug_log_says_where_a_wake_ups_milliseconds_went(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """One line per claim that found events: NOTIFY, loop, lane, claim, back, published, each
    the time since the stage before (the fake clock moves 1 ms per reading)."""
    h.step()  # connected, first (empty) claim done
    h.clock.tick = 0.001
    h.write(*keyed("a", 1), *keyed("b", 1))
    with caplog.at_level("DEBUG", logger="relay"):
        h.relay.wake()  # as the listener does when the NOTIFY arrives
        h.step()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("claim of")]
    assert len(lines) == 1, lines
    pattern = (
        r"claim of 2 events \(2 keys\): NOTIFY \+[\d.]+ ms loop, \+[\d.]+ ms lane, "
        r"\+[\d.]+ ms claim, \+[\d.]+ ms back, \+[\d.]+ ms published \(([\d.]+) ms in all\)"
    )
    match = re.fullmatch(pattern, lines[0])
    assert match, lines[0]
    assert float(match.group(1)) >= 5.0  # at least one fake millisecond per stage
    # Not woken by a NOTIFY (a poll): the line starts at the lane, and says nothing of one.
    h.publisher.settle()
    h.step()
    h.write(*keyed("c", 1))
    h.clock.advance(5)
    caplog.clear()
    with caplog.at_level("DEBUG", logger="relay"):
        h.step(3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("claim of")]
    assert lines and "NOTIFY" not in lines[0] and " ms lane" in lines[0], lines


def test_a_window_per_key_keeps_order_until_the_broker_refuses_one(tmp_path: Path) -> None:
    """--max-in-flight-per-key 3: three events of a key go out before the first confirm. When
    the broker refuses the first, the two after it were accepted already: consumers get them
    before the refused event's retry (the weaker order the README states), nothing is lost,
    and every event is published once it is accepted."""
    h = Harness(tmp_path, max_attempts=3, retry_min=10, retry_max=60, max_in_flight_per_key=3)
    try:
        h.write(*keyed("a", 5))
        ids = [str(r.id) for r in h.rows()]
        h.step()
        assert [m.message_id for m in h.publisher.outstanding] == ids[:3]
        h.publisher.decide = lambda m: (
            Outcome.REJECTED if m.message_id == ids[0] else Outcome.CONFIRMED
        )
        h.settle_and_step()
        assert [r.status for r in h.rows()] == [
            "pending",
            "published",
            "published",
            *["pending"] * 2,
        ]
        h.publisher.decide = lambda m: Outcome.CONFIRMED
        h.clock.advance(11)
        h.relay.wake()
        h.settle_and_step()
        sent = [m.message_id for m in h.publisher.published]
        assert sent == [ids[0], ids[1], ids[2], ids[0], ids[3], ids[4]]
        assert {r.status for r in h.rows()} == {"published"}
        assert h.key_rows() == []  # drained and freed once the last of the window settled
    finally:
        h.engine.dispose()


def test_a_window_frees_its_key_only_when_every_event_of_it_is_settled(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_in_flight_per_key=2)
    try:
        h.write(*keyed("a", 2))
        h.step()
        (lease,) = [k.lease_token for k in h.key_rows()]
        first, second = h.publisher.outstanding
        h.publisher.outstanding = [first]
        h.publisher.settle()  # the first confirmed; the second still in flight
        h.step(3)
        # Still this claim's: freed now, the key could be claimed again (by this relay or
        # another) and its second event sent a second time.
        assert [k.lease_token for k in h.key_rows()] == [lease]
        h.publisher.outstanding = [second]
        h.settle_and_step()
        assert h.leased_keys() == [] and {r.status for r in h.rows()} == {"published"}
        assert len(h.publisher.published) == 2
    finally:
        h.engine.dispose()


def test_a_refusal_inside_a_window_keeps_the_key_leased_until_the_window_settles(
    tmp_path: Path,
) -> None:
    """a1, a2, a3 go out together; the broker refuses a2 before it confirms a1 and a3 (a
    header the relay refuses before sending is answered at once, a confirm takes a round
    trip). The key stays this claim's until a1 and a3 are settled: their confirms are
    recorded, not fenced off as if another relay had the key (found by review: recording a2's
    failure ended the key's lease, so the confirms that followed were dropped and a1 and a3
    stayed pending, to be published again, or held for good behind a dead a2)."""
    h = Harness(tmp_path, max_attempts=3, retry_min=10, retry_max=60, max_in_flight_per_key=3)
    try:
        h.write(*keyed("a", 3))
        h.step()
        a1, a2, a3 = h.publisher.outstanding
        (lease,) = [k.lease_token for k in h.key_rows()]
        h.publisher.outstanding = [a2]
        h.publisher.decide = lambda m: Outcome.REJECTED
        h.publisher.settle()
        h.step(3)
        assert [k.lease_token for k in h.key_rows()] == [lease]
        h.publisher.outstanding = [a1, a3]
        h.publisher.decide = lambda m: Outcome.CONFIRMED
        h.publisher.settle()
        fenced = sum(h.relay.run_once(timeout=0).fenced for _ in range(3))
        assert fenced == 0
        assert [(r.status, r.attempts) for r in h.rows()] == [
            ("published", 0),
            ("pending", 1),
            ("published", 0),
        ]
        assert h.leased_keys() == []  # the key waits for a2's retry
        h.clock.advance(61)
        h.relay.wake()
        h.settle_and_step()
        sent = [m.message_id for m in h.publisher.published]
        assert sent == [a1.message_id, a2.message_id, a3.message_id, a2.message_id]
        assert {r.status for r in h.rows()} == {"published"}
    finally:
        h.engine.dispose()


def test_a_renewal_does_not_bring_back_a_lease_the_relay_gave_up(h: Harness) -> None:
    """a1 is in flight when the relay, paused past the lease, gives up its claim (a2 goes
    back). The next renewal still covers the claim (a1's outcome is to come) and the
    database still has it: that must not put the claim's deadline back, below the lower
    bound `_expire_lost_leases` trusts (found by review: the bound's promise, that no
    deadline is earlier, did not hold)."""
    h.write(*keyed("a", 2))
    h.step()
    assert len(h.publisher.outstanding) == 1
    h.clock.advance(31)
    h.step()  # lease given up: a2 withdrawn, a1 still in flight
    assert h.relay.sequencer.queued == 0 and h.relay.sequencer.in_flight == 1
    h.clock.advance(11)
    h.step()  # a renewal, answered "held"
    relay = h.relay
    assert all(d >= relay._earliest_deadline for d in relay._lease_deadline.values()), (
        relay._lease_deadline,
        relay._earliest_deadline,
    )


def test_a_claim_does_not_wait_behind_a_result_write(tmp_path: Path) -> None:
    """Claims have a database lane of their own: with a result write on its way (not yet
    answered), a new event's claim still goes out and its event is published."""
    h = Harness(tmp_path, worker=ManualWorker)
    writes, claims = _lanes(h)

    h.write(*keyed("a", 1))
    h.relay.wake()
    h.step()
    _turn(h, writes)  # the first housekeeping (heartbeat)
    _turn(h, claims)  # a1 claimed and published
    assert [m.routing_key for m in h.publisher.published] == ["order.placed"]
    h.publisher.settle()
    write_alone(h)  # a1 confirmed: its run is over, the write that frees key a goes out
    assert writes.jobs, "a result write is on its way"
    h.write(*keyed("b", 1))
    h.relay.wake()
    h.step()
    assert claims.jobs, "the claim went out with the write still on its way"
    _turn(h, claims)
    assert writes.jobs and len(h.publisher.published) == 2
    _turn(h, writes)  # the write lands afterwards: nothing lost, both marked in the end
    h.publisher.settle()
    for _ in range(5):
        let_writes_go(h)
        _turn(h, writes)
        _turn(h, claims)
    assert [r.status for r in h.rows()] == ["published", "published"]


# -- the two lanes, interleaved (found by review) ------------------------------------------


class FlakyWorker(ManualWorker):
    """ManualWorker whose pending jobs can be made to fail as an outage."""

    def fail_jobs(self) -> None:
        while self.jobs:
            _, done = self.jobs.pop(0)
            self.finished.append(
                Completion(done, None, DatabaseUnavailableError("database unavailable"))
            )


def _lanes(h: Harness) -> tuple[ManualWorker, ManualWorker]:
    """The relay's two lanes, made by a harness with `worker=ManualWorker`: results and
    housekeeping, then claims."""
    writes, claims = h.workers  # type: ignore[misc]
    assert isinstance(writes, ManualWorker) and isinstance(claims, ManualWorker)
    return writes, claims


def _started(h: Harness) -> tuple[ManualWorker, ManualWorker]:
    writes, claims = _lanes(h)
    h.relay.wake()
    h.step()
    writes.run_jobs()  # the first heartbeat
    writes.deliver()
    h.step()
    return writes, claims


def test_keys_freed_while_a_claim_runs_are_claimed_next_not_at_the_poll(tmp_path: Path) -> None:
    """A claim starts before the write that frees key a commits (so it cannot see a free);
    the write's answer comes first, then the claim's: the freed key must still be claimed at
    once (and `until_empty` must not think the table empty)."""
    h = Harness(tmp_path, worker=ManualWorker, run_length=1, poll_interval=30.0, until_empty=True)
    writes, claims = _started(h)
    h.write(*keyed("a", 2))
    h.relay.wake()
    h.step()
    claims.run_jobs()
    claims.deliver()
    h.step()  # a0 claimed (a run of one) and published
    h.clock.advance(0.05)
    h.publisher.settle()
    h.step()  # a0 confirmed: the write that frees key a, and a claim, both on their way
    assert writes.jobs and claims.jobs
    claims.run_jobs()  # the claim reads first: key a still leased, nothing
    writes.run_jobs()  # then key a is freed
    writes.deliver()
    h.step()
    claims.deliver()
    h.step()
    assert not h.relay._finished()
    assert claims.jobs, "the freed key is claimed at once"
    claims.run_jobs()
    claims.deliver()
    h.step()
    assert len(h.publisher.published) == 2


def test_the_database_is_up_only_when_both_lanes_answer(tmp_path: Path) -> None:
    h = Harness(tmp_path, worker=FlakyWorker)
    calls: list[bool] = []
    h.relay.metrics.database_up = calls.append  # type: ignore[method-assign]
    writes, claims = h.workers  # type: ignore[misc]
    assert isinstance(writes, FlakyWorker) and isinstance(claims, FlakyWorker)
    h.relay.wake()
    h.step()  # the heartbeat on one lane, a claim on the other
    writes.fail_jobs()
    writes.deliver()
    claims.fail_jobs()
    claims.deliver()
    h.step()
    assert calls == [False]  # told once
    h.clock.advance(11)
    h.step()  # the heartbeat again
    writes.run_jobs()
    writes.deliver()  # one lane answers; the claim lane has not yet
    h.step()
    assert calls == [False]
    h.relay._claims.soon()
    h.step()
    claims.run_jobs()
    claims.deliver()
    h.step()
    assert calls == [False, True]


def test_a_claim_answered_while_results_cannot_be_written_is_given_back(tmp_path: Path) -> None:
    """Its confirms could not be recorded nor its lease renewed: nothing of it goes out."""
    h = Harness(tmp_path, worker=FlakyWorker)
    writes, claims = h.workers  # type: ignore[misc]
    assert isinstance(writes, FlakyWorker) and isinstance(claims, FlakyWorker)
    h.write(*keyed("a", 1))
    h.relay.wake()
    h.step()  # the heartbeat on the write lane, the claim on the claim lane
    writes.fail_jobs()
    writes.deliver()
    h.step()
    assert h.relay._database.down
    claims.run_jobs()
    claims.deliver()
    h.step()
    assert h.publisher.published == []
    h.clock.advance(10)  # the database answers again: the give-back is written first
    for _ in range(6):
        let_writes_go(h)
        h.step()
        writes.run_jobs()
        writes.deliver()
        claims.run_jobs()
        claims.deliver()
        h.publisher.settle()
    assert [r.status for r in h.rows()] == ["published"]
    assert len(h.publisher.published) == 1


def test_the_loop_sleeps_while_the_write_lane_is_down(tmp_path: Path) -> None:
    """Jobs come due during an outage (a renewal, a heartbeat): the loop waits for the retry
    time, rather than stepping without a pause until then."""
    h = Harness(tmp_path, worker=FlakyWorker)
    writes, _ = _started(h)
    assert isinstance(writes, FlakyWorker)
    h.clock.advance(11)  # the heartbeat is due
    h.step()
    writes.fail_jobs()
    writes.deliver()
    h.step()
    relay = h.relay
    relay._next_heartbeat = h.clock.mono + 0.01
    h.clock.advance(0.05)
    assert relay._database.down
    assert relay._wait_time() > 0


def test_after_an_outage_no_claim_goes_out_before_the_write_lane_has_answered(
    tmp_path: Path,
) -> None:
    """Leases may have run out during the outage: the write lane's first job renews them (and
    writes the results kept meanwhile) before a claim could take this relay's own keys back
    and fence off those results (found by the fault suite: events out twice)."""
    h = Harness(tmp_path, worker=FlakyWorker)
    writes, claims = _started(h)
    assert isinstance(writes, FlakyWorker) and isinstance(claims, FlakyWorker)
    claims.run_jobs()  # the first claim: nothing there
    claims.deliver()
    h.clock.advance(11)
    h.step()  # the heartbeat, which fails
    writes.fail_jobs()
    writes.deliver()
    h.step()
    h.clock.advance(10)  # past the retry time: the lane is no longer down, not yet answered
    h.write(*keyed("a", 1))
    h.relay.wake()
    h.step()
    assert not h.relay._database.down and writes.jobs and not claims.jobs
    writes.run_jobs()
    writes.deliver()
    h.step()
    assert claims.jobs


def test_a_write_that_drains_its_keys_is_not_followed_by_a_claim(tmp_path: Path) -> None:
    """At low rates nearly every run drains its key: claiming after each such write found
    nothing, for a claim's CPU. A freed key with events left is claimed at once; a drained
    key's next event brings its own NOTIFY (or the poll finds it)."""
    h = Harness(tmp_path, worker=ManualWorker, run_length=1, poll_interval=30.0)
    writes, claims = _started(h)
    h.write(*keyed("a", 2), *keyed("b", 1))

    def claim_and_confirm() -> None:
        while claims.jobs:  # the claim, and the ones that follow it, finding nothing more
            claims.run_jobs()
            claims.deliver()
            h.step()
        h.publisher.settle()
        h.step()  # confirmed: the write that frees the keys goes out
        assert writes.jobs and not claims.jobs
        writes.run_jobs()
        writes.deliver()
        h.step()

    h.relay.wake()
    h.step()
    claim_and_confirm()  # a0 and b0: key a keeps a1, b is drained
    assert claims.jobs, "key a has an event left: claimed at once"
    claim_and_confirm()  # a1: key a drained
    assert not claims.jobs, "nothing left: no claim until a NOTIFY or the poll"
    assert [r.status for r in h.rows()] == ["published"] * 3


def test_a_claim_failed_in_an_outage_claims_again_once_its_lane_is_back(tmp_path: Path) -> None:
    """The NOTIFY that asked for the claim was spent on it, and the write retried after the
    outage drains its key (no claim follows such a write): the event must not wait for the
    poll interval (found by review)."""
    h = Harness(tmp_path, worker=FlakyWorker, run_length=1, poll_interval=30.0)
    writes, claims = _started(h)
    assert isinstance(writes, FlakyWorker) and isinstance(claims, FlakyWorker)

    while claims.jobs:
        _turn(h, claims)
    h.write(*keyed("a", 1))
    h.relay.wake()
    h.step()
    _turn(h, claims)  # a0 claimed and published
    h.publisher.settle()
    h.step()  # confirmed: the write that frees key a goes out
    h.write(*keyed("b", 1))
    h.relay.wake()
    h.step()  # b0's NOTIFY: a claim goes out
    assert writes.jobs and claims.jobs
    writes.fail_jobs()  # an outage hits both
    claims.fail_jobs()
    writes.deliver()
    claims.deliver()
    h.step()
    waited = 0.0
    while not claims.jobs and waited < 40:
        h.clock.advance(0.25)
        waited += 0.25
        h.step()
        while writes.jobs:
            _turn(h, writes)
    assert waited < 10, f"the claim for b0 went out {waited} s after the outage"


def test_no_claim_takes_this_relays_own_keys_while_its_write_is_stuck(tmp_path: Path) -> None:
    """a1 is confirmed and its write (the mark, and the end of key a's run) is stuck on the
    lane, slow but not failing, past the lease: the database then sees key a free. A claim
    then would take key a back under a new token and publish a1 again (its confirm is not
    written). Claims stop while the renewal is overdue (b's, before, still goes out); once
    the write lands and a renewal answers, they go on, and each event was published once
    (found by review)."""
    h = Harness(tmp_path, worker=ManualWorker, lease=3.0)
    writes, claims = _started(h)

    h.write(*keyed("a", 1))
    h.relay.wake()
    h.step()
    _turn(h, claims)  # a1 claimed and published
    h.publisher.settle()
    write_alone(h)  # a1 confirmed: its write goes out and gets stuck
    assert writes.jobs, "the write is on its way"
    h.write(*keyed("a", 1), *keyed("b", 1))
    for _ in range(8):  # 4 s: past the lease, which the database now sees over
        h.clock.advance(0.5)
        h.relay.wake()
        h.step()
        _turn(h, claims)
        h.publisher.settle()
        h.step()
    published = [m.message_id for m in h.publisher.published]
    assert len(published) == len(set(published)) == 2  # a1, and b1 before the renewal was due
    assert not claims.jobs, "no claim while the renewal is overdue"
    for _ in range(6):  # the write lands, a renewal answers, claims go on
        _turn(h, writes)
        h.relay.wake()
        _turn(h, claims)
        h.publisher.settle()
        h.step()
    published = [m.message_id for m in h.publisher.published]
    assert len(published) == len(set(published)) == 3
    assert [r.status for r in h.rows()] == ["published"] * 3


def test_claims_go_on_while_a_stuck_lane_holds_nothing_of_this_relay(tmp_path: Path) -> None:
    """The other lane stuck on housekeeping (the first heartbeat, never answered) and nothing
    held here: no lease can run out, and claims go on."""
    h = Harness(tmp_path, worker=ManualWorker, lease=3.0)
    writes, claims = _lanes(h)
    h.relay.wake()
    h.step()
    claims.run_jobs()  # the first claim finds nothing
    claims.deliver()
    h.step()
    assert writes.jobs
    h.clock.advance(10)
    h.write(*keyed("a", 1))
    for _ in range(3):
        h.relay.wake()
        h.step()
        claims.run_jobs()
        claims.deliver()
        h.step()
    assert len(h.publisher.published) == 1
    assert writes.jobs, "the heartbeat is still on its way"


def test_a_renewal_keeps_the_leases_of_claims_whose_confirms_are_not_yet_written(
    tmp_path: Path,
) -> None:
    """Both events of claim T confirmed while the other lane is busy: T has nothing left in
    flight, but its confirms are still to be written. The renewal that goes out first must
    renew T's leases, or they could run out before the write (and a claim, this relay's
    own too, publish the events again)."""
    h = Harness(tmp_path, worker=ManualWorker, lease=3.0)
    writes, claims = _lanes(h)
    renewed: list[set[uuid.UUID]] = []
    real_renew = h.store.renew

    def renew(tokens: Collection[uuid.UUID], *args: Any, **kwargs: Any) -> set[uuid.UUID]:
        renewed.append(set(tokens))
        return real_renew(tokens, *args, **kwargs)

    h.store.renew = renew  # type: ignore[method-assign]
    h.write(*keyed("a", 1), *keyed("b", 1))
    h.relay.wake()
    h.step()  # the first heartbeat goes out (and waits), and a claim
    claims.run_jobs()
    claims.deliver()
    h.step()
    assert len(h.publisher.published) == 2
    (token,) = {k.lease_token for k in h.key_rows()}
    h.publisher.settle()
    h.step()  # both confirmed; their write waits for the lane
    assert h.relay.sequencer.idle
    h.clock.advance(1.1)  # a renewal is due
    writes.run_jobs()  # the heartbeat answers
    writes.deliver()
    h.step()  # the lane is open: the renewal goes first
    writes.run_jobs()
    assert renewed and token in renewed[0]


def test_a_claim_on_its_way_during_a_renewal_still_counts_from_when_it_was_sent(
    tmp_path: Path,
) -> None:
    """Claim C1 is sent, a renewal goes out before C1 answers (so it cannot renew C1's
    leases, which run from C1's sending), then a0's write gets stuck: claims must stop a
    third of a lease before C1's leases can run out, not counting from the renewal (found
    by review: a0 went out twice)."""
    h = Harness(tmp_path, worker=ManualWorker, lease=3.0)
    writes, claims = _lanes(h)
    h.write(*keyed("a", 1))
    h.relay.wake()
    h.step()  # the first heartbeat, and claim C1 sent
    assert claims.jobs
    writes.run_jobs()
    writes.deliver()
    h.step()
    h.clock.advance(1.2)
    h.step()  # a renewal is due while C1 is on its way
    claims.run_jobs()
    claims.deliver()
    h.step()  # C1 answers: a0 published
    assert len(h.publisher.published) == 1
    h.publisher.settle()
    write_alone(h)  # a0 confirmed; its write goes out and is stuck
    assert writes.jobs
    for _ in range(19):  # past C1's lease
        h.clock.advance(0.1)
        h.relay.wake()
        h.step()
        claims.run_jobs()
        claims.deliver()
        h.step()
        h.publisher.settle()
        h.step()
    ids = [m.message_id for m in h.publisher.published]
    assert len(ids) == len(set(ids)) == 1


def test_a_write_of_confirms_that_fails_halfway_is_written_again_whole(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Freeing the key fails after the mark, inside the write's transaction: the mark goes
    with it, the retry writes both, and nothing reads as fenced off (before, the retry
    marked rows already published and reported them as taken by another relay; found by
    review)."""
    real = h.store._end_runs_sqlite
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> FreedKeys:
        calls["n"] += 1
        if calls["n"] == 1:
            raise DatabaseUnavailableError("database unavailable: connection cut")
        return real(*args, **kwargs)

    h.store._end_runs_sqlite = flaky  # type: ignore[method-assign]
    h.write(*keyed("a", 1))
    for _ in range(40):
        h.step()
        h.publisher.settle()
        h.clock.advance(0.5)
    assert calls["n"] >= 2
    assert [r.status for r in h.rows()] == ["published"] and h.key_rows() == []
    assert h.relay._report.fenced == 0 and "lease had passed" not in caplog.text


def test_no_claim_takes_this_relays_own_keys_after_the_wall_clock_jumps(tmp_path: Path) -> None:
    """Leases run on the wall clock, the loop's deadlines on the monotonic one: with a1's
    write on its way, the wall clock jumps past the lease (a suspended host: the monotonic
    clock stops, the wall clock does not). No claim may then take key a back and publish
    a1 again (found by review)."""
    h = Harness(tmp_path, worker=ManualWorker, lease=3.0)
    writes, claims = _lanes(h)
    h.relay.wake()
    h.step()
    _turn(h, writes)  # the first heartbeat
    h.write(*keyed("a", 1))
    h.relay.wake()
    h.step()
    _turn(h, claims)  # a1 claimed and published
    h.publisher.settle()
    write_alone(h)  # a1 confirmed: its write is on its way
    assert writes.jobs
    h.clock.wall += dt.timedelta(seconds=3.5)
    for _ in range(3):
        h.relay.wake()
        h.step()
        _turn(h, claims)
        h.publisher.settle()
        h.step()
    ids = [m.message_id for m in h.publisher.published]
    assert len(ids) == len(set(ids)) == 1


def test_a_renewal_keeps_the_row_of_a_keyless_failure_not_yet_written(tmp_path: Path) -> None:
    """A keyless event refused (to be retried in a minute) whose failure cannot be written
    for a while, renewals answering meanwhile: they must renew its row, or its lease runs
    out and this relay's own claim takes it back and publishes it long before its retry
    time, its attempt not counted (found by review)."""
    h = Harness(tmp_path, worker=ManualWorker, lease=3.0, retry_min=60, retry_max=60)
    writes, claims = _lanes(h)
    real_record = h.store.record_failures
    failing = {"on": True}

    def record_failures(*args: Any, **kwargs: Any) -> int:
        if failing["on"]:
            raise DatabaseUnavailableError("database unavailable: lock timeout")
        return real_record(*args, **kwargs)

    h.store.record_failures = record_failures  # type: ignore[method-assign]
    h.relay.wake()
    h.step()
    _turn(h, writes)
    h.write(Event(type="t", key=None, payload={"n": 1}))
    h.relay.wake()
    h.step()
    _turn(h, claims)
    assert len(h.publisher.published) == 1
    h.publisher.decide = lambda m: Outcome.REJECTED  # type: ignore[method-assign]
    h.publisher.settle()
    h.publisher.decide = lambda m: Outcome.CONFIRMED  # type: ignore[method-assign]
    h.step()
    for _ in range(60):  # 6 s, twice the lease
        h.clock.advance(0.1)
        h.relay.wake()
        h.step()
        _turn(h, writes)  # renewals answer, the failure's write fails
        _turn(h, claims)
    assert len(h.publisher.published) == 1, "published again before its retry time"
    failing["on"] = False
    for _ in range(5):
        h.clock.advance(0.5)
        h.step()
        _turn(h, writes)
    (row,) = h.rows()
    assert row.attempts == 1 and row.status == "pending"


def test_a_fatal_error_still_stops_the_broker_connection_and_closes_the_store(
    tmp_path: Path,
) -> None:
    """A result write that fails with an error no retry can fix is fatal: the relay stops.
    Its shutdown must not step the loop (each step raises the error again) and must still
    close what it opened (found by review: publisher, lanes and store were left open)."""
    h = Harness(tmp_path)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    h.store.mark_and_end_runs = broken  # type: ignore[method-assign]
    h.write(*keyed("a", 1))
    h.step()
    h.publisher.settle()
    with pytest.raises(RuntimeError, match="a bug"):
        for _ in range(5):
            h.step()
            let_writes_go(h)
    with pytest.raises(RuntimeError, match="a bug"):  # raised again, once all is closed
        h.relay.shutdown()
    assert h.publisher.stopped


def test_a_fatal_error_during_the_shutdowns_wait_still_closes_everything(
    tmp_path: Path,
) -> None:
    """The fatal error comes while the shutdown waits for the last write (a stop with a
    write on its way that fails for good): the shutdown still closes everything, then
    raises it (found by review)."""
    h = Harness(tmp_path, worker=ManualWorker)
    writes, claims = _started(h)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    h.store.mark_and_end_runs = broken  # type: ignore[method-assign]
    h.write(*keyed("a", 1))
    h.relay.wake()
    h.step()
    _turn(h, claims)  # a1 claimed and published
    h.publisher.settle()
    write_alone(h)  # a1 confirmed: its write goes out
    assert writes.jobs
    _, done = writes.jobs.pop(0)  # ...and fails; its answer waits in the mailbox
    writes.finished.append(Completion(done, None, RuntimeError("a bug")))
    writes.deliver()
    h.relay.request_stop()
    with pytest.raises(RuntimeError, match="a bug"):
        h.relay.shutdown()
    assert h.publisher.stopped


# -- a claim carries the confirms (relay/results.py, Store.write_and_claim) ------------------


def _quiet(h: Harness) -> tuple[ManualWorker, ManualWorker]:
    """`_started`, and the claim its wake-up asked for answered (it found nothing)."""
    writes, claims = _started(h)
    while claims.jobs:
        _turn(h, claims)
    return writes, claims


def _claim_now(h: Harness, claims: ManualWorker, *events: Event) -> None:
    """Write `events`, and let the claim their NOTIFY asks for answer."""
    h.write(*events)
    h.relay.wake()
    h.step()
    _turn(h, claims)


def _status(h: Harness) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for row in h.rows():
        out.setdefault(row.key, []).append(row.status)
    return out


def test_the_next_claim_carries_the_confirm_of_a_run_that_drained_its_key(
    tmp_path: Path,
) -> None:
    """At low rates each event drains its key: its confirm waits for the next event's claim,
    which writes it first, one database job for both (no write of its own)."""
    h = Harness(tmp_path, worker=ManualWorker, poll_interval=30.0)
    writes, claims = _quiet(h)
    _claim_now(h, claims, *keyed("a", 1))  # a1 claimed and published
    h.publisher.settle()
    h.step()  # a1 confirmed
    assert not writes.jobs and not claims.jobs  # the confirm waits
    h.write(*keyed("b", 1))
    h.relay.wake()
    h.step()
    assert not writes.jobs and len(claims.jobs) == 1
    _turn(h, claims)  # one job: a1 marked, a freed (drained: deleted), b1 claimed
    assert _status(h) == {"a": ["published"], "b": ["pending"]}
    assert h.leased_keys() == ["b"]
    assert [m.headers["ordering-key"] for m in h.publisher.published] == ["a", "b"]
    assert not writes.jobs


def test_a_run_whose_key_may_have_more_is_written_at_once_on_the_write_lane(
    tmp_path: Path,
) -> None:
    """a got its whole share (run_length 1) of a claim and has more: its key must be free
    before a claim can take it again, so its write does not wait for a claim."""
    h = Harness(tmp_path, worker=ManualWorker, poll_interval=30.0, run_length=1)
    writes, claims = _started(h)
    _claim_now(h, claims, *keyed("a", 2))  # a1 claimed and published
    h.publisher.settle()
    h.step()  # a1 confirmed
    assert len(writes.jobs) == 1, "the write went out at once"
    _turn(h, writes)
    assert _status(h) == {"a": ["published", "pending"]}
    _turn(h, claims)  # the freed key's next run, claimed at once
    assert len(h.publisher.published) == 2


def test_no_claim_carries_a_write_while_events_wait_to_be_published(tmp_path: Path) -> None:
    """With events queued, claims may be large: a carried write would hold the writers'
    locks of the keys it frees as long; b's confirm goes out alone once due."""
    h = Harness(tmp_path, worker=ManualWorker, poll_interval=30.0)
    writes, claims = _started(h)
    _claim_now(
        h, claims, *keyed("a", 3), *keyed("b", 1)
    )  # a1 and b1 published, a2 and a3 queued behind a1
    h.publisher.decide = lambda m: Outcome.CONFIRMED if m.headers["ordering-key"] == "b" else None
    h.publisher.settle()
    h.step()  # b1 confirmed; a1 still in flight
    h.write(*keyed("c", 1))
    h.relay.wake()
    h.step()
    assert len(claims.jobs) == 1
    _turn(h, claims)  # c1 claimed: b1's confirm not carried
    assert _status(h)["b"] == ["pending"]
    let_writes_go(h)
    h.step()
    assert len(writes.jobs) == 1
    _turn(h, writes)
    assert _status(h)["b"] == ["published"]


def test_a_carrying_claim_that_fails_puts_the_confirms_back_for_the_next_write(
    tmp_path: Path,
) -> None:
    """The outage rolls back the carried marks with the claim: a1's confirm goes back, is
    written once the database answers, and counts as written, not fenced."""
    h = Harness(tmp_path, worker=FlakyWorker, poll_interval=30.0)
    writes, claims = _started(h)
    assert isinstance(claims, FlakyWorker)
    _claim_now(h, claims, *keyed("a", 1))  # a1 claimed and published
    h.publisher.settle()
    h.step()
    h.write(*keyed("b", 1))
    h.relay.wake()
    h.step()
    claims.fail_jobs()  # the claim carrying a1's confirm: the database is unreachable
    claims.deliver()
    h.step()
    assert _status(h) == {"a": ["pending"], "b": ["pending"]}
    h.clock.advance(10)  # the database answers again
    for _ in range(4):
        let_writes_go(h)
        _turn(h, writes)
        _turn(h, claims)
        h.publisher.settle()
    assert _status(h) == {"a": ["published"], "b": ["published"]}
    assert [m.headers["ordering-key"] for m in h.publisher.published] == ["a", "b"]


def test_a_carrying_claim_that_takes_the_key_it_frees_again_asks_for_no_other_claim(
    tmp_path: Path,
) -> None:
    """One key at a low rate: a2's claim frees a (a1 confirmed) and takes a2 in one job;
    nothing is left to claim, so no claim follows it (it would find nothing, for a claim's
    CPU per event)."""
    h = Harness(tmp_path, worker=ManualWorker, poll_interval=30.0)
    writes, claims = _quiet(h)
    _claim_now(h, claims, *keyed("a", 1))
    h.publisher.settle()
    h.step()  # a1 confirmed: waits for a claim
    _claim_now(h, claims, *keyed("a", 1))  # a1 marked, a freed and a2 claimed, in one job
    assert _status(h) == {"a": ["published", "pending"]}
    assert len(h.publisher.published) == 2
    assert not claims.jobs and not writes.jobs


def test_no_write_goes_out_while_a_claim_carries_earlier_confirms_of_the_key(
    tmp_path: Path,
) -> None:
    """a1's confirm rides on b's claim; a2's confirm ends a's run meanwhile. Written first,
    a2's write would free a with a1 unmarked: the carried mark would be fenced off and the
    claim would take a1 again, published twice and out of order with no fault (found by
    review). Writes wait for the carrying claim."""
    h = Harness(tmp_path, worker=ManualWorker, poll_interval=30.0)
    writes, claims = _quiet(h)
    h.write(*keyed("a", 2))
    ids = [str(r.id) for r in h.rows()]
    h.relay.wake()
    h.step()
    _turn(h, claims)  # a1 and a2 claimed; a1 published, a2 queued behind it
    h.publisher.settle()
    h.step()  # a1 confirmed (the run goes on), a2 published: nothing queued any more
    h.write(*keyed("b", 1))
    h.relay.wake()
    h.step()  # b's claim goes out carrying a1's confirm
    assert len(claims.jobs) == 1 and not writes.jobs
    h.publisher.settle()
    h.step()  # a2 confirmed: a's run is over
    let_writes_go(h)
    h.step()
    assert not writes.jobs, "no write while the carrying claim is on its way"
    _turn(h, claims)
    for _ in range(5):
        h.publisher.settle()
        let_writes_go(h)
        _turn(h, writes)
        _turn(h, claims)
    sent = [m.message_id for m in h.publisher.published if m.headers["ordering-key"] == "a"]
    assert sent == ids
    assert _status(h) == {"a": ["published", "published"], "b": ["published"]}


def test_an_event_committed_while_its_key_is_in_flight_is_claimed_once_the_run_ends(
    tmp_path: Path,
) -> None:
    """a2 commits while a1 is in flight; its NOTIFY's claim finds a leased and takes nothing,
    and no NOTIFY will come for a2 again. a1's confirm must not wait for the batch interval
    or the poll: a claim goes out at once, carries it, and takes a2 (found by review)."""
    h = Harness(tmp_path, worker=ManualWorker, poll_interval=1.0)
    writes, claims = _quiet(h)
    _claim_now(
        h, claims, *keyed("a", 1)
    )  # a1 claimed (a drained as the claim saw it) and published
    h.write(*keyed("a", 1))
    h.relay.wake()
    h.step()
    while claims.jobs:
        _turn(h, claims)  # the NOTIFY's claim: a is leased, nothing
    h.publisher.settle()
    h.step()  # a1 confirmed; no time passes from here on
    for _ in range(3):
        _turn(h, writes)
        _turn(h, claims)
    assert len(h.publisher.published) == 2


# -- the carried write, second review ------------------------------------------------------


def _carrying_claim_on_its_way(h: Harness) -> tuple[ManualWorker, ManualWorker]:
    """a1 and c1 claimed together and published; a1 confirmed (drained: waits to be
    carried), c1 still in flight. b1's NOTIFY sends a claim carrying a1's confirm, which the
    test keeps on its way."""
    writes, claims = _quiet(h)
    _claim_now(h, claims, *keyed("a", 1), *keyed("c", 1))  # a1, c1 claimed and published
    settle_only(h, "a")
    h.step()  # a1 confirmed: waits for a claim to carry it; c1 still in flight
    h.write(*keyed("b", 1))
    h.relay.wake()
    h.step()  # b's claim goes out carrying a1's confirm
    assert len(claims.jobs) == 1 and not writes.jobs
    assert h.relay._carrying is not None
    return writes, claims


def settle_only(h: Harness, key: str | None, outcome: Outcome = Outcome.CONFIRMED) -> None:
    """Answer the outstanding messages of `key` only (the others stay in flight)."""
    pub = h.publisher
    mine = [m for m in pub.outstanding if m.headers.get("ordering-key") == key]
    rest = [m for m in pub.outstanding if m not in mine]
    pub.outstanding = mine
    decide = pub.decide
    pub.decide = lambda m: outcome
    pub.settle()
    pub.decide = decide
    pub.outstanding = rest


def _settle_c(h: Harness, outcome: Outcome) -> None:
    settle_only(h, "c", outcome)
    h.step()


def test_the_loop_does_not_spin_while_a_carrying_claim_holds_back_a_due_write(
    tmp_path: Path,
) -> None:
    """c1's refusal (due at once) arrives while the claim carrying a1's confirm, of the
    same claim, is on its way: it waits for that claim, and the loop waits with it rather
    than stepping without a pause until the claim answers (found by review)."""
    h = Harness(tmp_path, worker=ManualWorker, poll_interval=30.0, max_attempts=3, retry_min=10)
    writes, _ = _carrying_claim_on_its_way(h)
    _settle_c(h, Outcome.REJECTED)
    assert h.relay._results.due(stopping=False)
    h.step()
    assert not writes.jobs, "held back behind the carrying claim (fix 1a4775c)"
    assert h.relay._wait_time() > 0, "nothing can be done before the claim answers"


def _answer_claims(h: Harness, claims: ManualWorker) -> None:
    while claims.jobs:
        _turn(h, claims)


def test_a_renewal_during_a_carrying_claim_keeps_the_leases_of_what_it_carries(
    tmp_path: Path,
) -> None:
    """A renewal that goes out while a claim carries confirms renews their claims'
    leases too (found by review). Left out, with the database slow for less than two
    thirds of the lease each time, this relay's own claim took a1 back and published it
    twice: lease 60 s; T1 (a1, z1..z3) claimed at 1000; a slow heartbeat holds the write
    lane from 1010 to 1035, so the renewal due at 1020 waits; at 1035 b's claim carries
    T1's confirms and the renewal then went out with no token, moving `_renewed_at` to
    1035; the claim fails (an outage of its lane), the confirms go to the write lane, slow
    again until 1061; T1's lease had run out, but `_leases_safe` trusted `_renewed_at`."""
    h = Harness(tmp_path, worker=FlakyWorker, poll_interval=30.0, lease=60.0)
    writes, claims = _quiet(h)
    assert isinstance(claims, FlakyWorker)
    h.write(*keyed("a", 1), *keyed("z", 3))
    a1 = str(h.rows()[0].id)
    h.relay.wake()
    h.step()
    _turn(h, claims)  # T1: a1 and z1 published, z2 and z3 queued
    h.clock.advance(10)
    h.step()  # 1010: the heartbeat takes the write lane, and is slow
    assert writes.jobs
    _answer_claims(h, claims)
    settle_only(h, "a")
    h.step()  # a1 confirmed: not carried while z's events are queued
    _answer_claims(h, claims)
    h.clock.advance(10)
    h.step()  # 1020: the renewal is due, the lane is busy
    _answer_claims(h, claims)
    h.clock.advance(15)  # 1035
    for _ in range(3):
        settle_only(h, "z")
        h.step()
        _answer_claims(h, claims)
    h.write(*keyed("b", 1))
    h.relay.wake()
    h.step()  # b's claim carries T1's confirms
    assert h.relay._carrying is not None and claims.jobs
    while writes.jobs:
        _turn(h, writes)  # the heartbeat answers; then the renewal: no token to renew
    assert h.relay._renewed_at.monotonic == 1035.0
    claims.fail_jobs()  # the carrying claim meets an outage of its lane
    claims.deliver()
    h.step()
    let_writes_go(h)
    h.step()  # T1's confirms go to the write lane, which is slow again
    assert writes.jobs
    h.clock.advance(26)  # 1061: T1's lease has run out; the write is still on its way
    h.step()
    _answer_claims(h, claims)
    sent = [m.message_id for m in h.publisher.published]
    assert sent.count(a1) == 1, "a1 published twice, by this relay's own claim"


def test_a_carrying_claim_failing_after_its_commit_reports_no_lease_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim commits the carried write with itself, then drops the empty keys it
    locked in a transaction of its own: an outage there must not fail the claim, or its
    written confirms would go back, be written again, find nothing owned and read as
    fenced off by another relay (there is none; found by review)."""
    h = Harness(tmp_path, worker=FlakyWorker, poll_interval=30.0)
    writes, claims = _quiet(h)
    _claim_now(h, claims, *keyed("a", 1))  # a1 claimed and published
    h.publisher.settle()
    h.step()  # a1 confirmed: waits for a claim to carry it
    with h.engine.begin() as conn:  # a key row with nothing pending (a writer rolled back)
        conn.execute(
            sa.insert(h.box.keys).values(
                key="empty", available_at=dt.datetime(2025, 1, 1, tzinfo=dt.UTC), held=False
            )
        )
    real = h.store._drop_empty_keys
    calls = {"n": 0}

    def once(*args: object, **kw: object) -> object:
        if "empty" in args[1] and not calls["n"]:  # the claim's own drop, after its commit
            calls["n"] += 1
            raise DatabaseUnavailableError("connection lost after the claim committed")
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(h.store, "_drop_empty_keys", once)
    h.write(*keyed("b", 1))
    h.relay.wake()
    h.step()  # b's claim carries a1's confirm
    assert h.relay._carrying is not None
    _turn(h, claims)  # committed, then the outage: the job fails
    assert _status(h)["a"] == ["published"], "the carried write committed"
    h.clock.advance(10)
    fenced = 0
    for _ in range(4):
        let_writes_go(h)
        _turn(h, writes)
        fenced += h.relay._report.fenced
        _turn(h, claims)
        fenced += h.relay._report.fenced
    assert fenced == 0, "a written confirm reported as fenced off by another relay"


def test_results_of_other_claims_are_not_held_back_by_a_carrying_claim(
    tmp_path: Path,
) -> None:
    """c1 is of a claim of its own: its refusal is written at once, on the write lane, while
    the claim carrying a1's confirm is still on its way (a key has one lease: a result of
    another claim cannot end the lease of a1's key)."""
    h = Harness(tmp_path, worker=ManualWorker, poll_interval=30.0, max_attempts=3, retry_min=10)
    writes, claims = _quiet(h)
    _claim_now(h, claims, *keyed("a", 1))  # claim T1: a1 published
    _claim_now(h, claims, *keyed("c", 1))  # claim T2: c1 published
    settle_only(h, "a")
    h.step()  # a1 confirmed: waits for a claim to carry it
    h.write(*keyed("b", 1))
    h.relay.wake()
    h.step()  # b's claim goes out carrying a1's confirm
    assert h.relay._carrying is not None and len(claims.jobs) == 1
    _settle_c(h, Outcome.REJECTED)
    assert len(writes.jobs) == 1, "c1's failure went out beside the carrying claim"
    _turn(h, writes)
    _turn(h, claims)
    assert _status(h) == {"a": ["published"], "b": ["pending"], "c": ["pending"]}
    (failure,) = h.failures()
    assert failure.error == "no"


def test_a_missed_event_whose_runs_end_cannot_be_carried_is_written_at_once(
    tmp_path: Path,
) -> None:
    """a2 commits while a1 is in flight (its NOTIFY's claim finds a leased), and when a1's
    confirm comes no claim can carry it (z's events wait to be published): a's run end is
    written at once, and the key freed with events left asks for the claim that takes a2."""
    h = Harness(tmp_path, worker=ManualWorker, poll_interval=30.0)
    writes, claims = _quiet(h)
    _claim_now(h, claims, *keyed("a", 1), *keyed("z", 3))  # a1 and z1 out, z2 z3 queued
    h.write(*keyed("a", 1))
    h.relay.wake()
    h.step()
    while claims.jobs:
        _turn(h, claims)  # a2's NOTIFY: a is leased, nothing
    settle_only(h, "a")
    h.step()  # a1 confirmed, z's events still queued: no claim can carry the write
    assert len(writes.jobs) == 1, "written at once"
    _turn(h, writes)
    _turn(h, claims)
    assert len([m for m in h.publisher.published if m.headers["ordering-key"] == "a"]) == 2


def test_the_claim_job_only_reads_the_batch_it_carries(tmp_path: Path) -> None:
    """The job runs on the claim lane's thread while the loop reads the carried batch (a
    renewal takes its tokens and rows): the batch changes only when the loop takes the
    answer. Emptied by the job, it made a renewal's read of it raise "dictionary changed
    size during iteration" and stop the relay (found by review)."""
    h = Harness(tmp_path, worker=ManualWorker, poll_interval=30.0)
    _, claims = _carrying_claim_on_its_way(h)
    carried = h.relay._carrying
    assert carried is not None
    before = (dict(carried.acked), dict(carried.freed), carried.tokens())
    claims.run_jobs()  # committed on the lane's thread; the answer not yet taken
    assert (dict(carried.acked), dict(carried.freed), carried.tokens()) == before
    claims.deliver()
    h.step()
    assert h.relay._carrying is None and not carried
    assert _status(h)["a"] == ["published"]


# -- the claim before the write it carries (Store.claim_then_write) --------------------------


def _written_first_once(h: Harness) -> tuple[ManualWorker, ManualWorker]:
    """a1 published and confirmed; b1's claim carries a1's confirm, written first (as every
    relay starts): a drained, so the write left no key with events, and from then on the
    claims go first. b1 published and confirmed: its confirm waits for a claim."""
    writes, claims = _quiet(h)
    _claim_now(h, claims, *keyed("a", 1))
    h.publisher.settle()
    h.step()  # a1 confirmed: waits for a claim to carry it
    assert h.relay._write_first
    _claim_now(h, claims, *keyed("b", 1))  # a1 marked, a freed and deleted, b1 claimed
    assert not h.relay._write_first
    h.publisher.settle()
    h.step()  # b1 confirmed: waits
    return writes, claims


def test_a_carrying_claim_answers_before_its_write_and_its_events_go_out_at_once(
    tmp_path: Path,
) -> None:
    """After a carried write that left no key with events, the next claim goes first: its
    answer reaches the loop before the job (which writes b1's confirm after it) has
    completed, and c1 is published on it; the carried batch stays on its way until then."""
    h = Harness(tmp_path, worker=ManualWorker, poll_interval=30.0)
    writes, claims = _written_first_once(h)
    h.write(*keyed("c", 1))
    h.relay.wake()
    h.step()
    assert len(claims.jobs) == 1 and h.relay._carrying is not None
    job, done = claims.jobs.pop(0)
    result = job()  # c1 claimed (its answer posted at once), then b1's confirm written
    h.step()  # the loop takes the claim's answer; the job's completion is not delivered
    assert [m.headers["ordering-key"] for m in h.publisher.published] == ["a", "b", "c"]
    assert h.relay._carrying is not None, "the write's completion is still to come"
    claims.post(Completion(done, result, None))
    h.step()
    assert h.relay._carrying is None
    assert _status(h) == {"a": ["published"], "b": ["published"], "c": ["pending"]}
    assert not writes.jobs and not claims.jobs
    assert not h.relay._write_first


def test_a_write_after_its_claim_that_frees_a_key_with_events_claims_again_and_writes_first(
    tmp_path: Path,
) -> None:
    """b2 commits while b1's confirm waits: its NOTIFY's claim goes first and finds b still
    leased; the write after it frees b with b2 pending (kept), so a claim goes out at once
    for b2, and the next carrying claim writes first (a hot key's next event is waiting
    whenever its run ends)."""
    h = Harness(tmp_path, worker=ManualWorker, poll_interval=30.0)
    writes, claims = _written_first_once(h)
    h.write(*keyed("b", 1))
    h.relay.wake()
    h.step()
    assert len(claims.jobs) == 1
    _turn(h, claims)  # nothing claimed (b leased), then b1 marked and b freed: kept
    assert h.relay._write_first
    assert _status(h)["b"] == ["published", "pending"]
    assert len(claims.jobs) == 1, "the freed key's event is claimed at once"
    _turn(h, claims)
    assert [m.headers["ordering-key"] for m in h.publisher.published] == ["a", "b", "b"]
    assert not writes.jobs


def test_a_claim_whose_write_fails_after_it_committed_keeps_its_events_and_the_confirms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim committed and answered; the write after it meets an outage. c1 is this
    relay's all the same (published once), and b1's confirm goes back, to be written once
    the database answers: nothing lost, nothing twice."""
    h = Harness(tmp_path, worker=FlakyWorker, poll_interval=30.0)
    writes, claims = _written_first_once(h)
    real = h.store.mark_and_end_runs
    failures = {"left": 1}

    def outage_once(*args: Any, **kw: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise DatabaseUnavailableError("connection lost after the claim committed")
        return real(*args, **kw)

    monkeypatch.setattr(h.store, "mark_and_end_runs", outage_once)
    h.write(*keyed("c", 1))
    h.relay.wake()
    h.step()
    _turn(h, claims)  # c1 claimed and answered, then the write fails
    assert [m.headers["ordering-key"] for m in h.publisher.published] == ["a", "b", "c"]
    assert h.relay._carrying is None
    assert _status(h)["b"] == ["pending"], "the write was not made"
    h.clock.advance(10)  # the database answers again
    for _ in range(4):
        h.publisher.settle()
        let_writes_go(h)
        _turn(h, writes)
        _turn(h, claims)
    assert _status(h) == {"a": ["published"], "b": ["published"], "c": ["published"]}
    sent = [m.message_id for m in h.publisher.published]
    assert len(sent) == len(set(sent)) == 3


def test_a_claim_that_could_not_answer_early_comes_back_with_its_write_and_asks_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the notice cannot be raised, the store writes first and returns the claim with
    the write (`Store.claim_then_write`). b2 commits while b1's confirm waits: the one job
    frees b and takes b2, and the relay counts b as taken, so no claim follows it (one
    would find nothing, for a claim's CPU per event at one key)."""
    h = Harness(tmp_path, worker=ManualWorker, poll_interval=30.0)
    writes, claims = _written_first_once(h)

    def written_first(carried: Any, *, answer: Any, **terms: Any) -> Any:
        return h.store.write_and_claim(carried, **terms)

    monkeypatch.setattr(h.store, "claim_then_write", written_first)
    h.write(*keyed("b", 1))
    h.relay.wake()
    h.step()
    assert len(claims.jobs) == 1
    _turn(h, claims)  # b1 marked, b freed and b2 claimed, in one job
    assert _status(h)["b"] == ["published", "pending"]
    assert [m.headers["ordering-key"] for m in h.publisher.published] == ["a", "b", "b"]
    sent = [m.message_id for m in h.publisher.published]
    assert len(sent) == len(set(sent)), "a claim delivered twice"
    assert not claims.jobs and not writes.jobs
