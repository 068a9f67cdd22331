"""Where a wake-up's milliseconds go: from a NOTIFY to the first publish of what it brought.

With the `relay` logger at DEBUG, every claim that found events logs one line, e.g.

    claim of 3 events (3 keys): NOTIFY +0.2 ms loop, +0.1 ms lane, +1.9 ms claim,
    +0.1 ms back, +0.0 ms published (2.3 ms in all)

* NOTIFY -> loop: the listener thread received the notification; the loop took it.
* loop -> lane: the claim waited for the claim lane to the database (a claim before it).
* claim: the claim's own database time (round trips and locks), on the database thread.
* back: the answer travelled back to the loop.
* published: the first of its events was handed to the broker connection.

A claim that was not woken by a NOTIFY (a poll, a freed key, a full claim before it) starts
its line at the loop. Only timestamps are kept, one trace per claim, never per event.
"""

from __future__ import annotations

import dataclasses
import logging


@dataclasses.dataclass
class ClaimTrace:
    submitted_at: float  # the loop handed the claim to the database lane
    notified_at: float | None = None  # the listener received the NOTIFY that woke it
    seen_at: float | None = None  # the loop took that NOTIFY from its mailbox
    started_at: float | None = None  # the database thread began the claim
    answered_at: float | None = None  # ... and finished it
    delivered_at: float | None = None  # the loop took the answer

    def log(self, log: logging.Logger, *, published_at: float, events: int, keys: int) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        stages: list[tuple[str, float | None]] = [
            ("loop", self.seen_at),
            ("lane", self.submitted_at),
            ("claim", self.answered_at if self.started_at is not None else None),
            ("back", self.delivered_at),
            ("published", published_at),
        ]
        if self.started_at is not None:  # the lane's wait ends when the claim starts
            stages[1] = ("lane", self.started_at)
        first = self.notified_at if self.notified_at is not None else self.submitted_at
        parts: list[str] = []
        previous = first
        for name, at in stages:
            if at is None or at < first:
                continue
            parts.append(f"+{(at - previous) * 1000:.1f} ms {name}")
            previous = at
        origin = "NOTIFY " if self.notified_at is not None else ""
        log.debug(
            "claim of %d events (%d keys): %s%s (%.1f ms in all)",
            events,
            keys,
            origin,
            ", ".join(parts),
            (published_at - first) * 1000,
        )
