"""When the relay claims next.

At once after a wake-up (a NOTIFY, a stop request), after a claim that came back full, or
when keys were freed or the broker came back; otherwise on an adaptive poll that doubles from
`MIN_POLL` up to the poll interval while claims find nothing. A NOTIFY, or keys freed, while a
claim runs may be about events that claim did not see, so it makes the next claim immediate.
"""

from __future__ import annotations

from collections.abc import Callable

MIN_POLL = 0.01


class ClaimPacer:
    def __init__(self, monotonic: Callable[[], float], *, poll_interval: float) -> None:
        self._monotonic = monotonic
        self._poll_interval = poll_interval
        self.next_at = monotonic()
        self._delay = MIN_POLL
        self._wakes = 0
        self.notified = 0  # wake-ups so far (NOTIFYs): `relay.relay` compares two readings
        self.last_was_empty = False  # then the next claim probes first (one cheap query)

    def wake(self) -> None:
        """New events may be there (a NOTIFY): claim now, and poll fast again."""
        self._wakes += 1
        self.notified += 1
        self.next_at = self._monotonic()
        self._delay = MIN_POLL

    def soon(self) -> None:
        """Something became claimable (keys freed, the broker back): claim now. Counted like
        a wake-up: a claim running meanwhile (on its own lane, it can start before the write
        that freed keys commits) may not have seen them, so it is followed by another."""
        self._wakes += 1
        self.next_at = min(self.next_at, self._monotonic())

    @property
    def due(self) -> bool:
        return self._monotonic() >= self.next_at

    def started(self) -> int:
        """A claim goes out; returns its ticket for `finished()`."""
        self.next_at = self._monotonic() + self._poll_interval  # until it answers
        return self._wakes

    def finished(self, ticket: int, *, count: int, full: bool) -> None:
        self.last_was_empty = count == 0
        if full or self._wakes != ticket:
            self._delay = MIN_POLL
            self.next_at = self._monotonic()
        else:
            # Nothing more is free now: look again when a run ends, a NOTIFY arrives, or the
            # (backing-off) poll comes round.
            self._delay = min(self._poll_interval, self._delay * 2)
            self.next_at = self._monotonic() + self._delay
