"""Dead letters in the log without flooding it.

One broken route can kill thousands of events in a minute; one ERROR line each buries every
other line. The first few per window are logged in full (id, type, key, error), the rest are
counted and summarised in one line when the window ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from relay.logs import event_fields
from relay.records import Failure

BURST = 10
WINDOW = 60.0


class DeadLetterLog:
    def __init__(
        self,
        log: logging.Logger,
        monotonic: Callable[[], float],
        *,
        burst: int = BURST,
        window: float = WINDOW,
    ) -> None:
        self._log = log
        self._monotonic = monotonic
        self._burst = burst
        self._window = window
        self._window_start: float | None = None
        self._logged = 0
        self._suppressed = 0

    def dead(self, failure: Failure) -> None:
        self.flush()
        if self._window_start is None:
            self._window_start = self._monotonic()
        if self._logged >= self._burst:
            self._suppressed += 1
            return
        self._logged += 1
        event = failure.event
        self._log.error(
            "event %s (%s, key %s) is dead after %d attempts: %s",
            event.id,
            event.type,
            event.key,
            failure.attempt,
            failure.error,
            extra=event_fields(event.id, event.type, event.key, attempt=failure.attempt),
        )

    def flush(self) -> None:
        """End the window if it is over, with one line for what was not logged in it."""
        if self._window_start is None or self._monotonic() - self._window_start < self._window:
            return
        if self._suppressed:
            self._log.error(
                "%d more events went dead in the last %.0f s (not logged one by one): "
                "see `outbox-relay dead list`",
                self._suppressed,
                self._window,
            )
        self._window_start, self._logged, self._suppressed = None, 0, 0
