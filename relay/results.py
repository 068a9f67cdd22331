"""Publish outcomes waiting to be written to the outbox tables, and writing them.

The relay learns outcomes one by one from the broker and records them in batches: confirmed
rows are marked published, rejected ones get a retry time (or die), keys whose runs are done
are freed, and events without a key that were given back lose their row lease. Every write is
fenced by the claim's token, so results are kept by token. A batch is taken whole for a
database job (a write of its own, or the next claim's: `Store.write_and_claim`); if the job
fails, what it had not written goes back in front of whatever arrived meanwhile.

When a batch is due: failures, give-backs and runs whose keys may have more events at once
(the key must be free in the table before a claim can take it again); confirms, and runs
that drained their keys, within FLUSH_INTERVAL, or sooner with the next claim. At low rates
nearly every run drains its key, and that key's next event comes with a NOTIFY and a claim:
the claim carries the write, one round trip and one database job per event instead of two.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable

from relay.records import ClaimedEvent, Failure
from relay.store import Carried, Store, Written

# Confirmed results are written in batches, at most this late (see the module docstring).
FLUSH_INTERVAL = 0.02


@dataclasses.dataclass
class ResultBatch:
    """Results taken for one write. `write()` empties it as it goes: on an error, what is
    left is exactly what was not written."""

    acked: dict[uuid.UUID, list[int]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    failures: dict[uuid.UUID, list[Failure]] = dataclasses.field(
        default_factory=lambda: defaultdict(list)
    )
    # Events without a key given back unattempted: their row leases end.
    releases: dict[uuid.UUID, list[int]] = dataclasses.field(
        default_factory=lambda: defaultdict(list)
    )
    # Keys this relay is done with (run finished, or given back): their leases end.
    freed: dict[uuid.UUID, set[str]] = dataclasses.field(default_factory=lambda: defaultdict(set))

    # Set by `write()`: what it wrote left something for a claim to take now.
    left_claimable: bool = False
    # Something in it is to be written at once (see the module docstring).
    urgent: bool = False

    def __bool__(self) -> bool:
        return bool(self.acked or self.failures or self.releases or self.freed)

    @property
    def gives_keys_back(self) -> bool:
        """Writing this batch frees keys (or rows) for the next claim."""
        return bool(self.freed or self.releases or self.failures)

    def tokens(self) -> set[uuid.UUID]:
        """Claims with confirms or failures to write, or runs to end (their leases still
        matter)."""
        return set(self.acked) | set(self.failures) | set(self.freed)

    def claims(self) -> set[uuid.UUID]:
        """Every claim this batch writes about."""
        return self.tokens() | set(self.releases)

    def unwritten_seqs(self) -> list[int]:
        """The rows of the confirms and failures to write (those without a key carry their
        own lease, which must last until the write)."""
        seqs = [seq for seqs in self.acked.values() for seq in seqs]
        seqs.extend(f.event.seq for failures in self.failures.values() for f in failures)
        return seqs

    @property
    def carriable(self) -> bool:
        """Only confirms and finished runs: what a claim can write first."""
        return bool(self.acked or self.freed) and not (self.failures or self.releases)

    def carried(self, *, relay: str, delete: bool) -> Carried:
        """This batch (`carriable`) for a claim to write: `written_by_claim` once it did."""
        assert self.carriable
        return Carried(self.acked, self.freed, delete, relay)

    def written_by_claim(self, written: Written, claimed: Collection[str | None]) -> int:
        """The claim that carried this batch committed, and claimed events of the keys
        `claimed`; returns how many confirms were fenced off. A freed key with events left
        that the claim took again is not left to claim."""
        freed = {key for keys in self.freed.values() for key in keys}
        return self._confirms_written(written, taken=len(freed.intersection(claimed)))

    def _confirms_written(self, written: Written, *, taken: int = 0) -> int:
        fenced = sum(len(seqs) for seqs in self.acked.values()) - written.owned
        self.left_claimable = self.left_claimable or written.freed.kept > taken
        self.acked.clear()
        self.freed.clear()
        return fenced

    def write(
        self, store: Store, *, relay: str, now: dt.datetime, delete: bool, hold_key: bool
    ) -> int:
        """Write every result; returns how many were fenced off (the lease had passed on).

        Order matters: a key is freed only with or after its events' marks, or the next claim
        of the key would publish them again."""
        fenced = 0
        if self.acked and not self.failures and not self.releases:
            # The usual batch, confirms and the runs they finished: one write, one round trip.
            return self._confirms_written(
                store.mark_and_end_runs(self.acked, self.freed, now=now, delete=delete, relay=relay)
            )
        if self.acked:
            owned = store.mark_published(self.acked, now=now, delete=delete, relay=relay)
            fenced += sum(len(seqs) for seqs in self.acked.values()) - owned
            self.acked.clear()
        for token in list(self.failures):
            items = self.failures[token]
            recorded = store.record_failures(token, items, relay=relay, now=now, hold_key=hold_key)
            fenced += len(items) - recorded
            del self.failures[token]
            self.left_claimable = True
        for token in list(self.releases):
            store.release(token, self.releases[token], now=now)
            del self.releases[token]
            self.left_claimable = True
        if self.freed:
            # Only keys with events left are worth a claim now (the case of a backlog): a
            # drained key's next event brings a NOTIFY. At low rates nearly every run drains
            # its key, and claiming after each write found nothing, for a claim's CPU.
            if store.end_runs(self.freed, now=now).kept:
                self.left_claimable = True
            self.freed.clear()
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

    def confirmed(self, event: ClaimedEvent, *, run_finished: bool, drained: bool) -> None:
        """`drained`: the claim read every pending row of the event's key it saw (the key's
        next event comes with a NOTIFY, and a claim that can carry this)."""
        self._batch.acked[event.token].append(event.seq)
        if run_finished and event.key is not None:
            self._batch.freed[event.token].add(event.key)
            if not drained:
                self._batch.urgent = True
        self._note()

    def failed(self, failure: Failure) -> None:
        self._batch.failures[failure.event.token].append(failure)
        self._batch.urgent = True
        self._note()

    def give_back(
        self,
        events: Iterable[ClaimedEvent],
        *,
        busy: Callable[[str, uuid.UUID], bool] = lambda key, token: False,
    ) -> None:
        """Events handed back unattempted. Their keys are freed, except where the same claim
        still has an event of the key in flight (`busy`): that event's outcome frees it."""
        for event in events:
            if event.key is None:
                self._batch.releases[event.token].append(event.seq)
            elif not busy(event.key, event.token):
                self._batch.freed[event.token].add(event.key)
            self._batch.urgent = True
            self._note()

    def tokens(self) -> set[uuid.UUID]:
        return self._batch.tokens()

    def claims(self) -> set[uuid.UUID]:
        return self._batch.claims()

    def unwritten_seqs(self) -> list[int]:
        return self._batch.unwritten_seqs()

    def due(self, *, stopping: bool) -> bool:
        """Write now? (See the module docstring.)"""
        batch = self._batch
        if self._since is None:
            return False
        return (
            stopping
            or batch.urgent
            or self._monotonic() - self._since >= FLUSH_INTERVAL
            or sum(len(seqs) for seqs in batch.acked.values()) >= self._batch_size
        )

    def due_at(self) -> float | None:
        """When the batch interval runs out (None if nothing is waiting)."""
        return None if self._since is None else self._since + FLUSH_INTERVAL

    def take_carriable(self) -> ResultBatch | None:
        """Everything waiting, for a claim to write first (`ResultBatch.carriable`), if it
        can; None otherwise."""
        return self.take() if self._batch.carriable else None

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
        for token, keys in batch.freed.items():
            self._batch.freed[token].update(keys)
        # What the failed write did commit (failures, releases) may have left work to claim.
        self._batch.left_claimable |= batch.left_claimable
        self._batch.urgent |= batch.urgent
        if self._batch:
            self._note()

    def _note(self) -> None:
        if self._since is None:
            self._since = self._monotonic()
