"""Publish outcomes waiting to be written to the outbox table, and writing them.

The relay learns outcomes one by one from the broker and records them in batches: confirmed
rows are marked published, rejected ones get a retry time (or die), and rows given back
unattempted lose their lease. Every write is fenced by the claim's token, so results are kept
by token. A batch is taken whole for a database job; if the job fails, what it had not
written goes back in front of whatever arrived meanwhile.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable

from relay.records import ClaimedEvent, Failure
from relay.store import Store

# Confirmed results are written in batches: at most this late, or at once when a key's run is
# done (its rows must be free in the table before the next claim can take the key again).
FLUSH_INTERVAL = 0.02


@dataclasses.dataclass
class ResultBatch:
    """Results taken for one write. `write()` empties it as it goes: on an error, what is
    left is exactly what was not written."""

    acked: dict[uuid.UUID, list[int]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    failures: dict[uuid.UUID, list[Failure]] = dataclasses.field(
        default_factory=lambda: defaultdict(list)
    )
    releases: dict[uuid.UUID, list[int]] = dataclasses.field(
        default_factory=lambda: defaultdict(list)
    )
    runs_finished: bool = False  # a key's run ended: its key can be claimed once written

    def __bool__(self) -> bool:
        return bool(self.acked or self.failures or self.releases)

    @property
    def gives_keys_back(self) -> bool:
        """Writing this batch frees keys for the next claim."""
        return self.runs_finished or bool(self.releases)

    def write(self, store: Store, *, relay: str, now: dt.datetime, delete: bool) -> int:
        """Write every result; returns how many were fenced off (the lease had passed on)."""
        fenced = 0
        for token in list(self.acked):
            seqs = self.acked[token]
            fenced += len(seqs) - store.mark_published(token, seqs, now=now, delete=delete)
            del self.acked[token]
        for token in list(self.failures):
            items = self.failures[token]
            fenced += len(items) - store.record_failures(token, items, relay=relay, now=now)
            del self.failures[token]
        for token in list(self.releases):
            store.release(token, self.releases[token])
            del self.releases[token]
        return fenced


class PendingResults:
    """Outcomes not yet written, and when they are due to be."""

    def __init__(self, monotonic: Callable[[], float], *, batch_size: int) -> None:
        self._monotonic = monotonic
        self._batch_size = batch_size
        self._batch = ResultBatch()
        # When the oldest unwritten result arrived; None exactly while nothing is waiting.
        self._since: float | None = None

    def __bool__(self) -> bool:
        return bool(self._batch)

    def confirmed(self, event: ClaimedEvent, *, run_finished: bool) -> None:
        self._batch.acked[event.token].append(event.seq)
        self._batch.runs_finished = self._batch.runs_finished or run_finished
        self._note()

    def failed(self, failure: Failure) -> None:
        self._batch.failures[failure.event.token].append(failure)
        self._note()

    def give_back(self, events: Iterable[ClaimedEvent]) -> None:
        for event in events:
            self._batch.releases[event.token].append(event.seq)
            self._note()

    def tokens(self) -> set[uuid.UUID]:
        """Claims with confirms or failures still to write (their leases still matter)."""
        return set(self._batch.acked) | set(self._batch.failures)

    def due(self, *, stopping: bool) -> bool:
        """Write now? Failures, give-backs and finished runs at once; confirms in batches."""
        batch = self._batch
        if self._since is None:
            return False
        return (
            stopping
            or batch.runs_finished
            or bool(batch.failures or batch.releases)
            or self._monotonic() - self._since >= FLUSH_INTERVAL
            or sum(len(seqs) for seqs in batch.acked.values()) >= self._batch_size
        )

    def due_at(self) -> float | None:
        """When the batch interval runs out (None if nothing is waiting)."""
        return None if self._since is None else self._since + FLUSH_INTERVAL

    def take(self) -> ResultBatch:
        """Everything waiting, for one write; new results collect in a fresh batch."""
        batch, self._batch = self._batch, ResultBatch()
        self._since = None
        return batch

    def put_back(self, batch: ResultBatch) -> None:
        """A write failed: its unwritten rest goes before what arrived meanwhile."""
        for token, seqs in batch.acked.items():
            self._batch.acked[token][:0] = seqs
        for token, items in batch.failures.items():
            self._batch.failures[token][:0] = items
        for token, seqs in batch.releases.items():
            self._batch.releases[token][:0] = seqs
        self._batch.runs_finished = self._batch.runs_finished or batch.runs_finished
        if self._batch:
            self._note()

    def _note(self) -> None:
        if self._since is None:
            self._since = self._monotonic()
