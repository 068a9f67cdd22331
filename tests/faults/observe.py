"""Watching what the relay delivers, with arrival times, from the test thread.

`QueueTap` records deliveries in arrival order; fault tests also need *when* they arrived, to
measure how long the relay takes to deliver again once a fault heals. `Observer` drives the tap
in short steps and stamps each new delivery with the monotonic time of the step that received
it (resolution: one step, at most `STEP` seconds, less while messages flow).

Everything here runs in the test thread, which owns the tap's pika connection. The tap talks to
the real broker directly, never through a fault proxy, so the observation is not disturbed by
the faults under test.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Collection

from tests.support.history import Delivery
from tests.support.rabbit import QueueTap

#: Longest single wait on the tap: bounds how late a fault step or a deadline is noticed.
STEP = 0.1


class Observer:
    def __init__(self, tap: QueueTap) -> None:
        self.tap = tap
        self._arrivals: list[float] = []  # monotonic arrival time of tap.deliveries[i]
        self._seen: set[str] = set()
        self._seen_upto = 0

    @property
    def deliveries(self) -> list[Delivery]:
        return list(self.tap.deliveries)

    @property
    def arrivals(self) -> list[float]:
        """When each of `deliveries` arrived (monotonic), index for index."""
        return list(self._arrivals)

    @property
    def count(self) -> int:
        return len(self.tap.deliveries)

    def step(self, wait: float = STEP) -> int:
        """Receive for at most `wait` seconds (less once something arrives); new deliveries."""
        before = len(self.tap.deliveries)
        self.tap.drain(expected=before + 1, timeout=max(wait, 0.001))
        after = len(self.tap.deliveries)
        now = time.monotonic()
        if after < before or after < len(self._arrivals):
            # The tap lost its own connection and forgot unacknowledged deliveries; the broker
            # redelivers them, and they get new stamps.
            del self._arrivals[after:]
            self._seen = {d.message_id for d in self.tap.deliveries}
            self._seen_upto = after
        self._arrivals.extend([now] * (after - len(self._arrivals)))
        return max(0, after - before)

    def watch(self, seconds: float) -> int:
        """Keep receiving for `seconds` (the length of a fault); returns how many arrived."""
        deadline = time.monotonic() + seconds
        received = 0
        while (remaining := deadline - time.monotonic()) > 0:
            received += self.step(min(remaining, STEP))
        return received

    def wait_for_count(self, count: int, timeout: float) -> None:
        """Receive until at least `count` deliveries in total, or fail after `timeout` s."""
        deadline = time.monotonic() + timeout
        while self.count < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {self.count} of {count} deliveries arrived within {timeout} s"
                )
            self.step()

    def seconds_to_next_delivery(self, since: float, timeout: float) -> float | None:
        """Seconds from `since` (monotonic) to the first delivery after it; None if none came
        within `timeout` seconds of `since`."""
        deadline = since + timeout
        while True:
            index = bisect.bisect_right(self._arrivals, since)
            if index < len(self._arrivals):
                return self._arrivals[index] - since
            if time.monotonic() >= deadline:
                return None
            self.step(min(STEP, max(0.0, deadline - time.monotonic())))

    def seconds_until_delivered(
        self, message_id: str, since: float, timeout: float
    ) -> float | None:
        """Seconds from `since` (monotonic) until `message_id` was delivered; None if it was
        not within `timeout` seconds of `since`."""
        return self.seconds_until_any_delivered({message_id}, since, timeout)

    def seconds_until_any_delivered(
        self, ids: Collection[str], since: float, timeout: float
    ) -> float | None:
        """Seconds from `since` until the first delivery of one of `ids`; None if none was
        delivered within `timeout` seconds of `since`."""
        wanted = set(ids)
        deadline = since + timeout
        while not wanted & self.seen():
            if time.monotonic() >= deadline:
                return None
            self.step(min(STEP, max(0.0, deadline - time.monotonic())))
        index = next(i for i, d in enumerate(self.tap.deliveries) if d.message_id in wanted)
        return self._arrivals[index] - since

    def longest_gap(self, since: float) -> float:
        """The longest time without any delivery from `since` until the last delivery."""
        stamps = [since, *(t for t in self._arrivals if t > since)]
        return max((b - a for a, b in itertools.pairwise(stamps)), default=0.0)

    def seen(self) -> set[str]:
        """Message ids delivered so far."""
        deliveries = self.tap.deliveries
        for delivery in deliveries[self._seen_upto :]:
            self._seen.add(delivery.message_id)
        self._seen_upto = len(deliveries)
        return self._seen

    def wait_for_ids(self, ids: Collection[str], idle_timeout: float) -> set[str]:
        """Receive until every id in `ids` was delivered, or nothing new arrived for
        `idle_timeout` seconds; returns the ids still missing."""
        missing = set(ids) - self.seen()
        last_progress = time.monotonic()
        while missing:
            if self.step():
                last_progress = time.monotonic()
                missing -= self.seen()
            elif time.monotonic() - last_progress > idle_timeout:
                break
        return missing

    def settle(self, idle: float = 1.0) -> list[Delivery]:
        """Receive until nothing arrived for `idle` seconds (late duplicates, strays)."""
        last_progress = time.monotonic()
        while time.monotonic() - last_progress < idle:
            if self.step():
                last_progress = time.monotonic()
        return self.deliveries
