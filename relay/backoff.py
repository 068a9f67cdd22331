"""Exponential backoff with jitter, for rows waiting to be retried and for outages.

Calls retried in place (the publisher's reconnect loop) use tenacity. Rows and outages are
not retried in place: the relay *schedules* them and goes on with other work, so the delay is
computed here, from a random source that tests can seed.
"""

from __future__ import annotations

import random


def backoff_delay(
    attempt: int, *, initial: float, maximum: float, rng: random.Random | None = None
) -> float:
    """Delay before try number `attempt + 1`: doubling from `initial`, capped at `maximum`.

    Jitter ("equal jitter": half fixed, half random) spreads the retries of many rows that
    failed together, so a broker that comes back is not hit by all of them at once.
    """
    base = min(maximum, initial * 2 ** max(0, attempt - 1))
    return float(base / 2 + (rng or random).uniform(0, base / 2))
