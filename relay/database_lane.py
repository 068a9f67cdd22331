"""A lane to the database: one job at a time, and an outage with backoff. The relay has two,
one for its claims and one for everything else (`relay.relay`).

Three states: *open* (a job may be submitted), *busy* (one is on its way; its completion comes
back through the loop's inbox) and *down* (the last job found the database unreachable:
nothing is submitted before the retry time, and results wait in memory). Jobs run in
submission order.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

from relay.backoff import backoff_delay
from relay.errors import DatabaseUnavailableError
from relay.metrics import Metrics
from relay.worker import InlineWorker, Worker

log = logging.getLogger("relay")

RETRY_MIN = 0.2
RETRY_MAX = 5.0


class DatabaseHealth:
    """What the lanes of one relay found, told once: the database is *up* (metric, log) only
    while no lane's last job found it unreachable."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._failing: set[object] = set()  # the lanes whose last job found it unreachable

    def answered(self, lane: object) -> None:
        if lane in self._failing:
            self._failing.discard(lane)
            if not self._failing:
                log.info("database reachable again")
                self._metrics.database_up(True)

    def unreachable(self, lane: object) -> None:
        if not self._failing:
            self._metrics.database_up(False)
        self._failing.add(lane)


class DatabaseLane:
    def __init__(
        self,
        worker: Worker,
        *,
        monotonic: Callable[[], float],
        rng: random.Random,
        health: DatabaseHealth,
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        self._worker = worker
        self._here = InlineWorker()
        self._monotonic = monotonic
        self._rng = rng
        self._health = health
        self._on_fatal = on_fatal
        self.busy = False
        self.failures = 0  # consecutive outages; 0 while the database answers
        self.retry_at = monotonic()

    @property
    def down(self) -> bool:
        return self._monotonic() < self.retry_at

    @property
    def open(self) -> bool:
        return not self.busy and not self.down

    def submit(
        self,
        job: Callable[[], Any],
        done: Callable[[Any], None],
        *,
        on_error: Callable[[], None] | None = None,
        here: bool = False,
    ) -> None:
        """Run `job`; then `done(result)` on success, `on_error()` on any failure. An outage
        makes the lane *down*; any other error is fatal to the relay. With `here`, on the
        caller's thread, finished when this returns (the lane is the same: its failures,
        its backoff)."""

        def finished(result: Any, error: BaseException | None) -> None:
            self.busy = False
            if error is None:
                self._answered()
                done(result)
                return
            if on_error is not None:
                on_error()
            if isinstance(error, DatabaseUnavailableError):
                self._unreachable(error)
            else:
                self._on_fatal(error)

        self.busy = True
        (self._here if here else self._worker).submit(job, finished)

    def stop(self, timeout: float) -> None:
        self._worker.stop(timeout)

    def _answered(self) -> None:
        if self.failures:
            self._health.answered(self)
        self.failures = 0

    def _unreachable(self, exc: DatabaseUnavailableError) -> None:
        self.failures += 1
        delay = backoff_delay(self.failures, initial=RETRY_MIN, maximum=RETRY_MAX, rng=self._rng)
        self.retry_at = self._monotonic() + delay
        if self.failures == 1:
            self._health.unreachable(self)
        if self.failures == 1 or self.failures % 20 == 0:
            log.warning("%s; retrying in %.1fs (results are kept meanwhile)", exc, delay)
