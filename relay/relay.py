"""The relay loop: claim, publish in per-key order, record what the broker confirmed.

`run_once()` is one step: it waits (bounded) for something to happen, records publish
outcomes, renews leases, claims more events when there is room, hands the next event of each
key to the publisher, and does housekeeping when due. `run()` repeats it until asked to stop,
then drains gracefully. Outages are states, not exceptions: while the database is unreachable
the relay keeps its results in memory and retries with backoff; while the broker is down it
claims nothing and gives its unpublished rows back.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from relay.backoff import backoff_delay
from relay.claim_pacing import ClaimPacer
from relay.database_lane import DatabaseHealth, DatabaseLane
from relay.dead_letter_log import DeadLetterLog
from relay.errors import BrokerConfigError, BrokerRefusedError, DatabaseUnavailableError
from relay.logs import event_fields
from relay.mailbox import Mailbox, QueueMailbox
from relay.messages import (
    BrokerStatus,
    Outcome,
    OutgoingMessage,
    Publisher,
    PublisherEvent,
    PublishOutcome,
    Sink,
)
from relay.metrics import Metrics
from relay.records import Claim, ClaimedEvent, Failure
from relay.results import PendingResults, ResultBatch
from relay.sequencer import Sequencer
from relay.settings import RelaySettings
from relay.store import NOTHING_WRITTEN, Store, Written
from relay.tracing import PublishSpans
from relay.wake_trace import ClaimTrace
from relay.worker import Completion, ThreadWorker, Worker

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider
    from sqlalchemy.engine import Connection

log = logging.getLogger("relay")

HEARTBEAT_EVERY = 10.0
HOUSEKEEPING_EVERY = 30.0
# The longest a claim on the loop's own thread may hold the loop (`_here_deadline`), and how
# long claims go on the lane after one failed (`_pause_claims_here`).
HERE_DEADLINE = 1.0
HERE_PAUSE = 30.0
PURGE_BATCH = 1000
PURGE_BATCHES_PER_TICK = 10
MAX_WAIT = 1.0


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Instant(NamedTuple):
    """A moment on both of the relay's clocks: leases run on the wall clock (the database
    compares them with it), the loop's deadlines on the monotonic one, and either can jump
    ahead of the other (a suspended host, a clock set forward)."""

    monotonic: float
    wall: dt.datetime

    def earliest(self, other: Instant | None) -> Instant:
        if other is None:
            return self
        return Instant(min(self.monotonic, other.monotonic), min(self.wall, other.wall))


class _ClaimNote(NamedTuple):
    """What the relay keeps of a claim for its runs' ends (`Relay._run_finished`)."""

    unfinished: frozenset[str]  # keys it may have left events of
    notified: int  # `ClaimPacer.notified` when it went out


class Background(Protocol):
    """A helper thread the relay starts and stops with itself (the LISTEN listener)."""

    def start(self) -> None: ...

    def stop(self, timeout: float = ...) -> None: ...


@dataclasses.dataclass(frozen=True)
class _Wake:
    """Mailbox item: look for new events now (a NOTIFY arrived, or stop was requested)."""

    notified_at: float | None = None  # when the listener received the NOTIFY


_WAKE = _Wake()

# What the loop is told: publish outcomes and broker status, finished database jobs, wake-ups.
Mail = Sequence[PublisherEvent] | _Wake | Completion


class _TooSlowHere(NamedTuple):
    """A claim on the loop's thread that failed: the database's error, after how long."""

    error: DatabaseUnavailableError
    seconds: float


@dataclasses.dataclass
class StepReport:
    claimed: int = 0
    published: int = 0
    confirmed: int = 0
    rejected: int = 0
    dead: int = 0
    unknown: int = 0
    fenced: int = 0


class Relay:
    def __init__(
        self,
        settings: RelaySettings,
        store: Store,
        publisher_factory: Callable[[Sink], Publisher],
        *,
        listener_factory: Callable[[Callable[[], None]], Background] | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        worker_factory: Callable[[Callable[[Completion], None]], Worker] = ThreadWorker,
        mailbox: Mailbox[Mail] | None = None,
        tracer_provider: TracerProvider | None = None,
        claims_here: bool = False,
    ) -> None:
        """`claims_here`: claims may run on this thread when nothing else is going on
        (`_quiet_enough_for_a_claim_here`); the daemon's relay does (`relay.app`)."""
        self.settings = settings
        self.store = store
        self.metrics = metrics or Metrics()
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        # Everything the loop is told (confirms, finished jobs, wake-ups) arrives here.
        self._mailbox: Mailbox[Mail] = mailbox if mailbox is not None else QueueMailbox()
        self.publisher = publisher_factory(self._mailbox.put)
        # Two lanes to the database, each one job at a time on a thread (and connections) of
        # its own: results, lease renewal and housekeeping on one, claims on the other, so
        # that a claim never waits behind a result write (on the path of every event at low
        # rates: the claim waited about as long for the lane as it took itself). Nothing
        # needs a claim to see a write that has not committed yet: a key this relay frees
        # is claimable once its write commits, by whichever claim comes next.
        health = DatabaseHealth(self.metrics)
        self._database, self._claim_lane = (
            DatabaseLane(
                worker_factory(self._mailbox.put),
                monotonic=monotonic,
                rng=self._rng,
                health=health,
                on_fatal=self._set_fatal,
            )
            for _ in range(2)
        )
        self._claims = ClaimPacer(monotonic, poll_interval=settings.poll_interval)
        self._listener = listener_factory(self.wake) if listener_factory else None
        self.sequencer = Sequencer(settings.max_in_flight, per_key=settings.max_in_flight_per_key)
        self._results = PendingResults(monotonic, batch_size=settings.batch_size)
        # Refusals inside a window, by (key, token), recorded once the window has settled:
        # recording one ends the key's lease (relay/store.py record_failures), and the
        # confirms of the window's other events, fenced by that lease, would be dropped.
        self._held_failures: dict[tuple[str, uuid.UUID], list[Failure]] = {}
        self._lease_deadline: dict[uuid.UUID, float] = {}
        # What each claim's runs' ends need, by token (`_run_finished`).
        self._claim_notes: dict[uuid.UUID, _ClaimNote] = {}
        # No deadline in `_lease_deadline` is earlier (it may be later: a lower bound). The
        # loop steps thousands of times a second and claims hundreds of times, so looking at
        # every claim's deadline on every step cost a steady third of a core at 200 events/s.
        self._earliest_deadline = float("inf")
        self._published_at: dict[int, float] = {}
        now = self._monotonic()
        self._next_renew = now + settings.lease / 3
        # Every lease this relay holds runs at least `lease` past this: when the last renewal
        # that answered was sent, or the claim on its way then, if earlier (claims sent since
        # run later). Moved on at once while the relay holds nothing.
        self._renewed_at = Instant(now, clock())
        self._writing: ResultBatch | None = None  # the results on their way, on the write lane
        self._carrying: ResultBatch | None = None  # ... and those a claim carries
        # Whether the next claim that carries results writes them before it claims
        # (`Store.write_and_claim`) or after (`Store.claim_then_write`), by what the last such
        # write found (`_carried_written`). Written first, the claim can take a key the write
        # frees; written after, the claim's events do not wait for the write.
        self._write_first = True
        self._claim_sent_at: Instant | None = None  # the claim on its way, when it was sent
        self._next_housekeeping = now
        self._next_heartbeat = now
        self._broker_up = False
        self._broker_node: str | None = None  # host:port of the node connected to
        self._stop_requested = threading.Event()
        self._started_at = clock()
        self._fatal: BaseException | None = None
        self._report = StepReport()
        self._dead_letters = DeadLetterLog(log, monotonic)
        # The first NOTIFY since the last claim went out (received, taken by the loop), and
        # the claim whose first publish is still to be logged (relay/wake_trace.py).
        self._notified: tuple[float, float] | None = None
        self._untraced: tuple[ClaimTrace, int, int] | None = None
        self._spans = PublishSpans(tracer_provider)  # OpenTelemetry, when installed
        self._claims_here = claims_here and store.claims_here_supported
        # Claims here: until when they go on the lane instead (`_pause_claims_here`), and the
        # opening of their connections (`_open_claim_connections`), on a worker of its own.
        self._here_paused_until = 0.0
        self._opener = worker_factory(self._mailbox.put) if self._claims_here else None
        self._opening = False
        self._open_after = 0.0
        self._open_failures = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.publisher.start()
        if self._listener is not None:
            self._listener.start()

    def wake(self) -> None:
        """Thread-safe: look for new events now (a NOTIFY arrived). From the loop itself
        (where the listener reads), without a system call (`Mailbox.put`)."""
        self._mailbox.put(_Wake(self._monotonic()))

    def request_stop(self) -> None:
        """Thread-safe (and signal-safe): stop claiming and drain."""
        self._stop_requested.set()
        self._mailbox.interrupt(_WAKE)

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested.is_set()

    def run(self) -> None:
        """Run until `request_stop()` (or, with `until_empty`, until nothing is ready)."""
        self.start()
        try:
            while not self._stop_requested.is_set():
                self.run_once()
                if self.settings.until_empty and self._finished():
                    break
        finally:
            self.shutdown()

    def _finished(self) -> bool:
        return (
            self._claims.last_was_empty
            and self.sequencer.idle
            and not self._results
            and not self._lanes_busy
            and self._database.failures == 0
            and self._claim_lane.failures == 0
        )

    @property
    def _lanes_busy(self) -> bool:
        return self._database.busy or self._claim_lane.busy

    def _set_fatal(self, error: BaseException) -> None:
        self._fatal = error

    def shutdown(self) -> None:
        """Graceful stop: claim nothing more, wait (bounded) for outstanding confirms, record
        them, give back what was never published, close the connections."""
        self._stop_requested.set()
        self._give_back(self.sequencer.withdraw())
        deadline = self._monotonic() + self.settings.stop_timeout
        # After a fatal error the loop cannot step (each step raises it again, here too if
        # it comes during this wait): no more waiting, and what is left is closed all the
        # same; the error is raised once everything is.
        while (
            self._fatal is None
            and self._monotonic() < deadline
            and (self.sequencer.in_flight or self._results or self._lanes_busy)
        ):
            if not self.sequencer.in_flight and not self._lanes_busy and self._database.down:
                break  # only writes remain and the database is down: nothing to wait for
            try:
                self.run_once(timeout=min(0.2, max(0.0, deadline - self._monotonic())))
            except BaseException as exc:
                if exc is not self._fatal:
                    raise
        leftover = self.sequencer.in_flight_events()
        if leftover:
            log.warning(
                "stopping with %d events unconfirmed: they are given back and will be "
                "published again (same message_id)",
                len(leftover),
            )
        self.publisher.stop(timeout=5.0)  # what was in flight comes back as UNKNOWN
        if self._listener is not None:
            self._listener.stop()
        self._database.stop(timeout=self.settings.db_timeout)
        self._claim_lane.stop(timeout=self.settings.db_timeout)
        if self._opener is not None:
            # A connection still being opened is closed by its job (`_open_claim_connections`).
            self._opener.stop(timeout=0.1)
        self._collect(0)  # take in what the publisher and the workers still had to say
        try:
            # A write on its way owns its results: leave them, and what must follow them.
            if self._writing is None and not self._held_back():
                self._fenced(self._write(self._results.take()))
            self.store.unregister(self.settings.name)
        except DatabaseUnavailableError as exc:
            log.warning("could not record final results (%s); their leases will expire", exc)
        except Exception as exc:
            if self._fatal is None:
                raise
            # A fatal error of the database meets the final write again (a broker's does
            # not): told, not raised over the error that stopped the relay.
            log.warning(
                "after the fatal error, could not record final results (%s); their events "
                "will be published again once their leases expire (same message_id)",
                exc,
            )
        finally:
            self.store.close()
            self._mailbox.close()
        if self._fatal is not None:
            raise self._fatal

    # -- one step --------------------------------------------------------------------------

    def run_once(self, timeout: float | None = None) -> StepReport:
        report = self._report = StepReport()
        self._collect(self._wait_time() if timeout is None else timeout)
        if self._fatal is not None:
            raise self._fatal
        self._expire_lost_leases()
        self._dead_letters.flush()
        # Hand out the next event of every confirmed key first, then give the database its
        # work: the database runs on its own thread while confirms keep coming in here.
        self._publish()
        self._schedule_database_work()
        self._publish()
        return report

    def _schedule_database_work(self) -> None:
        """Submit the next due claim on the claim lane, and the next due job of the other lane
        while it is open, most urgent first:

        1. lease renewal (one statement, every third of the lease): a late one loses the
           lease and the work done under it, and the claim lane, which does not wait for
           this one, would then claim the relay's own keys again. Put after the writes, it
           was starved by them when every write is slow (a slow link, runs ending all the
           time): the fault suite saw a lease run out and an event go out twice;
        2. results: confirms must be recorded, and a finished run's key freed, before a claim
           can see the key free again;
        3. housekeeping (heartbeat, retention purge), which can always wait.

        (A worker that runs jobs inline finishes each at once, so then every due job runs in
        this step.)"""
        for submit in (self._submit_renewal, self._submit_writes, self._submit_housekeeping):
            if not self._database.open:
                break
            submit()
        if self._claim_lane.open:
            self._submit_claim()
        self._open_claim_connections()

    def _wait_time(self) -> float:
        """Until the next job of a lane that is not busy is due (a busy lane's completion
        wakes the loop), at most MAX_WAIT."""
        now = self._monotonic()
        due = [now + MAX_WAIT]
        if self._database.down:
            due.append(self._database.retry_at)  # nothing goes out on it before
        elif not self._database.busy:
            due += [self._next_renew, self._next_housekeeping, self._next_heartbeat]
            flush_at = self._results.due_at()
            # Results held back wait for the carrying claim, whose answer wakes the loop.
            if flush_at is not None and not self._held_back():
                if self._results.due(stopping=self.stop_requested):
                    return 0.0
                due.append(flush_at)
        if not self._claim_lane.busy and self._claim_possible():
            due.append(max(self._claims.next_at, self._claim_lane.retry_at))
        return min(MAX_WAIT, max(0.0, min(due) - now))

    def _collect(self, wait: float) -> None:
        """Take everything in the mailbox; wait up to `wait` for the first item."""
        for item in self._mailbox.take(wait):
            self._handle(item)

    def _handle(self, item: Mail) -> None:
        if isinstance(item, Completion):
            item.deliver()
            return
        if isinstance(item, _Wake):
            self._claims.wake()
            if item.notified_at is not None and self._notified is None:
                self._notified = (item.notified_at, self._monotonic())
            return
        # One reading of the clocks for the whole delivery: outcomes come in hundreds at once.
        settled_at = self._clock()
        monotonic = self._monotonic()
        for event in item:
            if isinstance(event, PublishOutcome):
                self._outcome(event, settled_at, monotonic)
            else:
                self._broker_status(event)

    def _outcome(self, outcome: PublishOutcome, settled_at: dt.datetime, monotonic: float) -> None:
        self._spans.settled(outcome)
        report = self._report
        sent_at = self._published_at.pop(outcome.tag, None)
        if outcome.outcome is Outcome.CONFIRMED:
            event = self.sequencer.confirmed(outcome.tag)
            if event is None:
                return
            report.confirmed += 1
            # The run ends with its last event settled: with a window of several, the other
            # events of the key in flight keep the key leased until their outcomes come.
            run_finished = event.key is None or not (
                self.sequencer.has_queued(event.key) or self.sequencer.busy(event.key, event.token)
            )
            if run_finished and event.key is not None:
                self._run_finished(event)
            else:
                self._results.confirmed(event, run_finished=run_finished, drained=True)
            self._window_settled(event)
            self.metrics.published(
                event.type,
                (settled_at - event.occurred_at).total_seconds(),
                monotonic - sent_at if sent_at is not None else 0.0,
            )
            return
        event, rest = self.sequencer.stopped(outcome.tag)
        if event is None:
            return
        if outcome.outcome is Outcome.UNKNOWN:
            # Fate unknown (connection lost): publish again, without spending an attempt.
            report.unknown += 1
            self._give_back([event, *rest])
            self._window_settled(event)
            return
        # The failure ends the key's lease (until its retry, or held if dead); the rest of
        # the run goes back unattempted.
        self._give_back(rest)
        report.rejected += 1
        failure = self._failure(
            event, outcome.error or "rejected by broker", retryable=outcome.retryable
        )
        if failure.next_attempt_at is None:
            report.dead += 1
            self._dead_letters.dead(failure)
        else:
            log.warning(
                "publish of event %s (%s, key %s) failed, attempt %d of %d, retry at %s: %s",
                event.id,
                event.type,
                event.key,
                failure.attempt,
                self.settings.max_attempts,
                failure.next_attempt_at.isoformat(timespec="seconds"),
                failure.error,
                extra=event_fields(
                    event.id,
                    event.type,
                    event.key,
                    attempt=failure.attempt,
                    max_attempts=self.settings.max_attempts,
                    next_attempt_at=failure.next_attempt_at,
                ),
            )
        self.metrics.failed(event.type, dead=failure.next_attempt_at is None)
        if event.key is None:
            self._results.failed(failure)
            return
        # With others of its window in flight, the key stays leased until they are settled.
        self._held_failures.setdefault((event.key, event.token), []).append(failure)
        self._window_settled(event)

    def _window_settled(self, event: ClaimedEvent) -> None:
        """Record the refusals held for `event`'s window once nothing of it is in flight. They
        go after the window's confirms (a batch writes confirms first), so what the broker
        accepted is marked published while the claim still holds the key."""
        if event.key is None or self.sequencer.busy(event.key, event.token):
            return
        for failure in self._held_failures.pop((event.key, event.token), ()):
            self._results.failed(failure)

    def _give_back(self, events: Sequence[ClaimedEvent]) -> None:
        """Hand events back unattempted; their keys are freed unless still in flight here."""
        self._results.give_back(events, busy=self.sequencer.busy)

    def _failure(self, event: ClaimedEvent, error: str, *, retryable: bool = True) -> Failure:
        attempt = event.attempts + 1
        if attempt >= self.settings.max_attempts or not retryable:
            return Failure(event=event, error=error, next_attempt_at=None)
        delay = backoff_delay(
            attempt, initial=self.settings.retry_min, maximum=self.settings.retry_max, rng=self._rng
        )
        return Failure(
            event=event, error=error, next_attempt_at=self._clock() + dt.timedelta(seconds=delay)
        )

    def _broker_status(self, status: BrokerStatus) -> None:
        self.metrics.broker_up(status.up)
        if status.fatal:
            kind = BrokerRefusedError if status.refused else BrokerConfigError
            self._fatal = kind(status.error or "broker refused the relay's topology")
            return
        if status.up:
            if status.node is not None:
                self._broker_node = status.node
                self._next_heartbeat = self._monotonic()  # `status` shows the node at once
                self.metrics.broker_node(status.node)
            if not self._broker_up:
                log.info("broker connected (node %s)", status.node)
            self._broker_up = True
            self._claims.soon()
            return
        if self._broker_up and not self._stop_requested.is_set():
            log.warning("broker connection lost: %s; reconnecting", status.error)
        self._broker_up = False
        # Queued events go back to the table; in-flight ones come back as UNKNOWN outcomes.
        self._give_back(self.sequencer.withdraw())

    # -- database work ---------------------------------------------------------------------

    def _held_back(self) -> bool:
        """Whether the results waiting must wait for the claim carrying earlier ones: they
        share a claim with them. Written first, a later result of a key (its run's end, a
        failure) would end the key's lease before the carried confirms of it are marked:
        those would be fenced off, and the claim would take their events again. Results of
        other claims go out meanwhile (their keys are others: a key has one lease)."""
        return self._carrying is not None and bool(self._results.claims() & self._carrying.claims())

    def _submit_writes(self) -> None:
        if self._held_back() or not self._results.due(stopping=self.stop_requested):
            return
        # The job owns the batch until it completes; new results collect in a fresh one.
        batch = self._results.take()
        frees_keys = batch.gives_keys_back  # known now: writing empties the batch

        self._writing = batch

        def done(fenced: int) -> None:
            self._writing = None
            self._batch_written(batch, fenced, frees_keys=frees_keys)

        def failed() -> None:
            self._writing = None
            self._results.put_back(batch)

        self._database.submit(lambda: self._write(batch), done, on_error=failed)

    def _batch_written(self, batch: ResultBatch, fenced: int, *, frees_keys: bool) -> None:
        self._fenced(fenced)
        if frees_keys and (batch.left_claimable or self.settings.until_empty):
            # Keys whose runs just ended with events left (or were given back) can be
            # claimed again. (`until_empty` looks once more in any case, to know it is
            # done.)
            self._claims.soon()

    def _write(self, batch: ResultBatch) -> int:
        return batch.write(
            self.store,
            relay=self.settings.name,
            now=self._clock(),
            delete=self.settings.retention == 0,
            hold_key=self.settings.dead_letters_hold_key,
        )

    def _fenced(self, count: int) -> None:
        if count > 0:
            self._report.fenced += count
            self.metrics.lease_lost(count)
            log.warning(
                "%d results were not recorded: the lease had passed to another relay", count
            )

    def _claim_possible(self) -> bool:
        """Claim while a whole batch fits under 2 x `batch_size` queued events. The bound is on
        events (memory), but what a claim buys is keys: each key's run is up to `run_length`
        events, and a key whose run ended waits for the next claim. Claiming only below half
        a batch (as before) left a third of the keys idle at 100 keys; claiming as soon as
        a batch fits keeps them busy (measured: 82 of 100 keys in flight on average, against
        52 to 62) for at most twice the memory."""
        return (
            self._broker_up
            and self.publisher.ready
            # Nor while results cannot be written, until the other lane has answered again
            # (its first job then renews the leases): leases could not be renewed meanwhile,
            # and a claim of keys whose leases ran out would take this relay's own keys,
            # fence off their unwritten confirms and publish those events twice.
            and self._database.failures == 0
            and self._leases_safe()
            and not self._stop_requested.is_set()
            and self.sequencer.queued <= self.settings.batch_size
            and self.sequencer.in_flight < self.settings.max_in_flight
        )

    def _leases_safe(self) -> bool:
        """Whether a claim may go out as far as this relay's own leases go: not while a
        renewal is overdue (its lane stuck on a slow write, or the renewal itself slow):
        this relay's own leases may then run out in the database, and a claim
        of this relay would take its own keys, fence off their unwritten confirms and
        publish those events twice. Renewals go out every third of the lease and answer in
        milliseconds, so claims stop only once the last answered one is two thirds of a
        lease old: a third of a lease before any lease it renewed can run out, as a claim
        already on its way takes only keys whose leases ran out before it was sent. They go
        on once a renewal answers (or, holding nothing, is due). On both clocks: the wall
        clock's (the leases') may have moved on more than the loop's."""
        overdue = 2 * self.settings.lease / 3
        if self._monotonic() < self._renewed_at.monotonic + overdue and (
            self._clock() < self._renewed_at.wall + dt.timedelta(seconds=overdue)
        ):
            return True
        # Overdue: safe only while this relay holds no lease that matters.
        return (
            self._writing is None
            and self._carrying is None
            and not self._results
            and self.sequencer.idle
        )

    def _carries_results(self) -> bool:
        """Whether the next claim writes the results waiting first (`Store.write_and_claim`;
        only confirms and finished runs can go: `PendingResults.take_carriable`).

        Not while a write is on its way: they would be written out of turn. And only while
        no event waits to be published: the relay has caught up, so its claims are small and
        what new events wait for, and carrying the write saves a round trip and a database
        job per event (at 200 events/s, a fifth of the relay's CPU). The write goes after
        the claim, off the path of its events, unless the last one showed that claims need
        it first (`_carried_written`). A claim that writes first holds the writers' locks
        of the keys it frees until it commits (see `Store.write_and_claim`): with events
        queued, claims can be large, and writers would wait that long."""
        return self._writing is None and self._carrying is None and not self.sequencer.queued

    def _quiet_enough_for_a_claim_here(self) -> bool:
        """Whether the claim about to go out (its results taken) runs on this thread rather
        than on the claim lane's: two thread hand-offs fewer, and its events are on the
        socket before the write it carries answers (`_submit_claim`). Measured at 200/s:
        relay CPU and p99 a fifth to a third lower (`bench/HISTORY.md`).

        Why the loop may wait for it: only while nothing else is going on (no event queued
        or in flight, no write on its way, no result waiting but those it carries), so that
        nothing but this claim's own carried results can need the loop meanwhile; and only
        for `_here_deadline()`, shared by all its calls (`Store.deadline`): the call then
        running is cancelled on the server, rolled back, and cut one deadline later if the
        cancel did not end it (a dead link), so the loop waits twice the deadline at most;
        claims then go on the lane for `HERE_PAUSE` (`_pause_claims_here`). Those results'
        leases were renewed within two thirds of a lease (`_leases_safe`, which any claim
        needs): a third of a lease is left, more than that wait, so they are renewed in
        time after it. And only on connections already open (`Store.claims_here_possible`):
        a new one would wait for the connection's timeout; they are opened off the loop
        (`_open_claim_connections`)."""
        return self._writing is None and self.sequencer.idle and not self._results

    def _here_deadline(self) -> float:
        return min(HERE_DEADLINE, self.settings.lease / 10)

    def _claims_here_now(self) -> bool:
        return (
            self._claims_here
            and self._claim_lane.failures == 0
            and self._monotonic() >= self._here_paused_until
            and self._quiet_enough_for_a_claim_here()
            and self.store.claims_here_possible()
        )

    def _pause_claims_here(self, what: str) -> None:
        """A claim here failed (cancelled at its deadline, or the database unreachable) or
        lost a connection: claims go on the claim lane for a while. Not an outage of its
        own: the lane's next claim, with the full `--db-timeout`, finds out whether the
        database is down."""
        self._here_paused_until = self._monotonic() + HERE_PAUSE
        log.warning(
            "a claim on the relay's loop %s; claims go on the claim thread for the next %.0f s",
            what,
            HERE_PAUSE,
        )

    def _open_claim_connections(self) -> None:
        """Open, off the loop, the connections claims here need (`Store.claims_here_possible`)
        once the relay is quiet enough for one and has none; adopted by the loop's thread
        when made. A failure backs off (a role's connection limit, a pooler's full pool):
        claims go on the lane meanwhile."""
        if not (
            self._claims_here
            and self.store.claims_here_supported
            and not self._opening
            and not self._stop_requested.is_set()
            and self._claim_lane.failures == 0
            and self._database.failures == 0
        ):
            return
        now = self._monotonic()
        if now < max(self._open_after, self._here_paused_until):
            return
        if self.store.keeps_claim_connections() or not self._quiet_enough_for_a_claim_here():
            return
        self._opening = True
        store, stopping = self.store, self._stop_requested

        def open_them() -> list[Connection]:
            conns = store.open_claim_connections()
            if stopping.is_set():  # the loop may no longer take them
                store.close_connections(conns)
                return []
            return conns

        def opened(conns: list[Connection] | None, error: BaseException | None) -> None:
            self._opening = False
            if error is not None:
                self._open_failures += 1
                delay = backoff_delay(self._open_failures, initial=1.0, maximum=60.0, rng=self._rng)
                self._open_after = self._monotonic() + delay
                if self._open_failures == 1 or self._open_failures % 20 == 0:
                    log.warning(
                        "could not open the connections for claims on the relay's loop "
                        "(%s); claims go on the claim thread, trying again in %.0f s",
                        error,
                        delay,
                    )
                return
            self._open_failures = 0
            if not conns:
                return
            if self._stop_requested.is_set():
                self.store.close_connections(conns)
            else:
                self.store.adopt_claim_connections(conns)

        assert self._opener is not None
        self._opener.submit(open_them, opened)

    def _submit_claim(self) -> None:
        if not (self._claim_possible() and self._claims.due):
            return
        started = self._monotonic()
        now = self._clock()
        carried = self._results.take_carriable() if self._carries_results() else None
        here = self._claims_here_now()
        frees_keys = carried is not None and carried.gives_keys_back
        self._carrying = carried
        probe_first = self._claims.last_was_empty and carried is None
        notified = self._claims.notified
        ticket = self._claims.started()
        trace = ClaimTrace(submitted_at=started)
        if self._notified is not None:
            trace.notified_at, trace.seen_at = self._notified
            self._notified = None

        terms: dict[str, Any] = {
            "owner": self.settings.name,
            "limit": self.settings.batch_size,
            "run_length": self.settings.run_length,
            "lease_until": now + dt.timedelta(seconds=self.settings.lease),
            "now": now,
        }

        # Built here: the job only reads the batch; the loop alone changes it (when the
        # claim has answered), as the loop also reads it meanwhile (renewals).
        confirms = (
            carried.carried(relay=self.settings.name, delete=self.settings.retention == 0)
            if carried is not None
            else None
        )

        write_first = self._write_first

        def answered(claim: Claim) -> None:
            """On the claim lane's thread: the claim committed, the write it carries is still
            to come. Its answer goes to the loop ahead of the job's completion."""
            trace.answered_at = self._monotonic()
            self._mailbox.put(
                Completion(
                    lambda _result, _error: self._claimed(claim, started, ticket, trace, notified),
                    None,
                    None,
                )
            )

        def answered_here(claim: Claim) -> None:
            """On this thread, inside the store's reading of the script: its events are
            published and on the socket while the write's answer is still to come. Nothing
            raises out of here into the store (the write's outcome must still be read): an
            error of the relay's own is fatal, as it would be on the loop."""
            trace.answered_at = self._monotonic()
            try:
                self._claimed(claim, started, ticket, trace, notified)
                self._publish()
                self.publisher.flush()
            except Exception as exc:
                self._set_fatal(exc)

        def claim() -> tuple[Written, Claim | None]:
            trace.started_at = self._monotonic()
            try:
                if confirms is not None and not write_first:
                    answer = answered_here if here else answered
                    return self.store.claim_then_write(confirms, answer=answer, **terms)
                if confirms is not None:
                    return self.store.write_and_claim(confirms, **terms)
                if probe_first and not self.store.has_ready(now):
                    # An idle table costs one cheap query per poll, not a whole claim.
                    return NOTHING_WRITTEN, Claim(token=uuid.uuid4(), events=(), lease_until=now)
                return NOTHING_WRITTEN, self.store.claim(**terms)
            finally:
                if trace.answered_at is None:
                    trace.answered_at = self._monotonic()

        def done(answer: tuple[Written, Claim | None] | _TooSlowHere) -> None:
            if isinstance(answer, _TooSlowHere):
                self._pause_claims_here(f"failed after {answer.seconds:.2f} s ({answer.error})")
                failed()
                return
            written, claim = answer  # no claim: it answered on its own (`answered`)
            if carried is not None:
                self._carrying = None
                # A claim that answered early ran before its write: it took none of the keys
                # the write freed. One returned with its write ran after it: the keys it
                # took again are not left to claim.
                taken = {event.key for event in claim.events} if claim is not None else set()
                self._carried_written(carried, written, taken, frees_keys=frees_keys)
            if claim is not None:
                self._claimed(claim, started, ticket, trace, notified)

        def failed() -> None:
            # A claim that answered before its write failed is this relay's all the same:
            # its answer is taken like any other.
            self._claim_sent_at = None
            if carried is not None:
                self._carrying = None
                self._results.put_back(carried)
            # A failed claim claims again once its lane is back (its lane's retry time
            # governs), not a poll interval later: the NOTIFY that asked for it was spent.
            self._claims.soon()

        self._claim_sent_at = Instant(started, now)
        if not here:
            self._claim_lane.submit(claim, done, on_error=failed)
            return

        def claim_by_the_deadline() -> tuple[Written, Claim | None] | _TooSlowHere:
            started_here = self._monotonic()
            try:
                with self.store.deadline(self._here_deadline()):
                    answer = claim()
            except DatabaseUnavailableError as exc:
                return _TooSlowHere(exc, self._monotonic() - started_here)
            if not self.store.keeps_claim_connections():
                # It answered, but past its deadline (its cancel went out too late) or a
                # step after it failed: a connection was left. As after a failure, or
                # the next claims would reopen connections one after the other.
                self._pause_claims_here(
                    f"lost a connection after {self._monotonic() - started_here:.2f} s"
                )
            return answer

        self._claim_lane.submit(claim_by_the_deadline, done, on_error=failed, here=True)
        # A claim that answered with its job (it carried no write): its events go out now.
        self._publish()
        self.publisher.flush()

    def _carried_written(
        self,
        carried: ResultBatch,
        written: Written,
        taken: set[str | None],
        *,
        frees_keys: bool,
    ) -> None:
        """A claim's carried write committed. The next carrying claim writes first only if
        this write freed a key with events left (`FreedKeys.kept`): a key whose next event
        was already waiting when its run ended, as one busy key's is every time. Claiming
        after such a write would find that key still leased, and the event would wait for a
        claim after the write. Otherwise the claim goes first, and its events do not wait
        for the write (about half a millisecond at low rates)."""
        self._write_first = written.freed.kept > 0
        fenced = carried.written_by_claim(written, taken)
        self._batch_written(carried, fenced, frees_keys=frees_keys)

    def _run_finished(self, event: ClaimedEvent) -> None:
        """The confirm of the last event of a run: the key is to be freed. At once if its
        claim may have left events of it (`Claim.unfinished`); otherwise it waits for the
        next claim to carry it (`relay.results`), which a NOTIFY brings when the key's next
        event commits. Unless a NOTIFY came after its claim went out: that event may be of
        this key, committed too late for the claim and skipped by the claims since (the key
        was leased), and no NOTIFY will come for it again; a claim goes out now, carrying
        this write. It takes it, or, if it claims before it writes, the write finds the key
        with events left (`FreedKeys.kept`), and the relay claims again (`_batch_written`).
        The same holds for a key's next event whose NOTIFY brings the claim."""
        note = self._claim_notes.get(event.token)
        drained = note is None or event.key not in note.unfinished
        missed = drained and note is not None and self._claims.notified != note.notified
        if missed and not self._carries_results():
            drained = False  # no claim can carry it now: written at once, which then asks
        self._results.confirmed(event, run_finished=True, drained=drained)
        if missed and drained:
            self._claims.soon()

    def _claimed(
        self, claim: Claim, started: float, ticket: int, trace: ClaimTrace, notified: int
    ) -> None:
        self._claim_sent_at = None
        trace.delivered_at = self._monotonic()
        count = len(claim.events)
        self._claims.finished(ticket, count=count, full=count >= self.settings.batch_size)
        if not count:
            return
        if self._stop_requested.is_set() or not self._broker_up or self._database.failures:
            # Claimed while stopping, losing the broker, or while results cannot be written
            # (nor leases renewed): back, to be written with the rest once that is possible.
            self._give_back(claim.events)
            return
        # Measured from before the claim: the local view of the lease never outlives it.
        self._lease_deadline[claim.token] = started + self.settings.lease
        self._claim_notes[claim.token] = _ClaimNote(claim.unfinished, notified)
        self._earliest_deadline = min(self._earliest_deadline, started + self.settings.lease)
        stale = self.sequencer.add(claim.events)
        if stale:
            log.warning(
                "a claim returned %d keys this relay still held under an expired lease; "
                "their older queued events (%d) are dropped, the new claim goes on",
                len({e.key for e in stale}),
                len(stale),
            )
        self._report.claimed += count
        self.metrics.claimed(count)
        if log.isEnabledFor(logging.DEBUG):
            self._untraced = (trace, count, len({e.key for e in claim.events}))

    def _publish(self) -> None:
        if not (self._broker_up and self.publisher.ready):
            return
        events = self.sequencer.take()
        if not events:
            return
        now = self._monotonic()
        for event in events:
            self._published_at[event.seq] = now
        # Sent by the lease's local deadline at the latest: the I/O loop sends them only when
        # the relay next waits, and a process frozen in between must not send them after
        # another relay took their keys over.
        messages: list[OutgoingMessage] = []
        unsendable: list[PublishOutcome] = []
        held_back: list[PublishOutcome] = []
        broken: set[str] = set()  # keys with an event no message can be made of
        for event in events:
            if event.key in broken:
                # Behind it in its window (--max-in-flight-per-key): not sent past it.
                held_back.append(
                    PublishOutcome(event.seq, Outcome.UNKNOWN, "not sent: behind a refusal")
                )
                continue
            try:
                messages.append(
                    event.message(
                        self.settings.exchange, send_by=self._lease_deadline.get(event.token)
                    )
                )
            except Exception as exc:
                # A row no message can be made of (its headers text is not a JSON object:
                # written around the writer). Refused for good, as the publisher refuses a
                # message it cannot encode (out of memory: retryable): it must not stop the
                # relay on every claim of it.
                if event.key is not None:
                    broken.add(event.key)
                unsendable.append(
                    PublishOutcome(
                        event.seq,
                        Outcome.REJECTED,
                        f"cannot build the message from the outbox row: {exc!r}",
                        retryable=isinstance(exc, MemoryError),
                    )
                )
        self._spans.published(messages)
        self.publisher.publish(messages)
        self._report.published += len(messages)
        for outcome in (*unsendable, *held_back):
            self._outcome(outcome, self._clock(), self._monotonic())
        if self._untraced is not None:
            trace, count, keys = self._untraced
            self._untraced = None
            trace.log(log, published_at=self._monotonic(), events=count, keys=keys)

    def _submit_renewal(self) -> None:
        now = self._monotonic()
        if now < self._next_renew:
            return
        self._next_renew = now + self.settings.lease / 3
        # Claims with events here, and claims whose results are still to be written: a
        # lease that ran out before the write would let a claim (this relay's own, too)
        # publish the confirmed events again.
        writing = [batch for batch in (self._writing, self._carrying) if batch is not None]
        tokens = self.sequencer.tokens() | self._results.tokens()
        for batch in writing:
            # On its way: its leases must last until it commits. (A claim that carries it
            # runs beside this renewal.)
            tokens |= batch.tokens()
        self._forget_finished_claims(tokens)
        # A claim on its way is not renewed here: its leases run from when it was sent.
        wall = self._clock()
        floor = Instant(now, wall).earliest(self._claim_sent_at)
        if not tokens:
            self._renewed_at = floor
            return
        until = wall + dt.timedelta(seconds=self.settings.lease)

        def renewed(held: set[uuid.UUID]) -> None:
            self._renewed_at = floor
            for token in tokens:
                if token not in held:
                    self._lease_lost(token)
                elif token in self._lease_deadline:
                    # A claim given up meanwhile (or before, with an outcome still to come)
                    # stays given up: its queued events went back.
                    self._lease_deadline[token] = now + self.settings.lease

        keyless = self.sequencer.keyless_seqs() + self._results.unwritten_seqs()
        for batch in writing:
            keyless += batch.unwritten_seqs()
        self._database.submit(lambda: self.store.renew(tokens, until, keyless=keyless), renewed)

    def _forget_finished_claims(self, live: set[uuid.UUID]) -> None:
        for token in list(self._lease_deadline):
            if token not in live:
                del self._lease_deadline[token]
        for token in list(self._claim_notes):
            if token not in live:
                del self._claim_notes[token]

    def _expire_lost_leases(self) -> None:
        """A claim whose lease may have run out (e.g. the process was paused) publishes no more:
        another relay may own its rows by now."""
        now = self._monotonic()
        if now < self._earliest_deadline:
            return
        self._earliest_deadline = float("inf")
        for token, deadline in list(self._lease_deadline.items()):
            if now >= deadline:
                self._lease_lost(token)
            else:
                self._earliest_deadline = min(self._earliest_deadline, deadline)

    def _lease_lost(self, token: uuid.UUID) -> None:
        withdrawn = self.sequencer.withdraw(token)
        self._lease_deadline.pop(token, None)
        if withdrawn:
            log.warning(
                "lease of %d queued events ran out before they were published; "
                "leaving them to whichever relay claims them next",
                len(withdrawn),
            )
            self._give_back(withdrawn)  # fenced: harmless if another relay owns them

    def _submit_housekeeping(self) -> None:
        now = self._monotonic()
        heartbeat = now >= self._next_heartbeat
        purge = now >= self._next_housekeeping and self.settings.retention > 0
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + HOUSEKEEPING_EVERY
        if not (heartbeat or purge):
            return
        if heartbeat:
            self._next_heartbeat = now + HEARTBEAT_EVERY
        wall = self._clock()
        cutoff = wall - dt.timedelta(seconds=self.settings.retention)
        broker_node = self._broker_node if self._broker_up else None

        def housekeeping() -> int:
            if heartbeat:
                self.store.heartbeat(
                    name=self.settings.name,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    started_at=self._started_at,
                    now=wall,
                    broker_node=broker_node,
                )
            purged = 0
            for _ in range(PURGE_BATCHES_PER_TICK if purge else 0):
                deleted = self.store.purge_published(cutoff, limit=PURGE_BATCH)
                purged += deleted
                if deleted < PURGE_BATCH:
                    break
            return purged

        def done(purged: object) -> None:
            if purged:
                log.info("purged %d published events older than the retention", purged)

        self._database.submit(housekeeping, done)
