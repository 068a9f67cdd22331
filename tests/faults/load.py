"""Application writers for fault tests: threads committing (and rolling back) outbox events.

Each thread writes small transactions of its own, the way request handlers do, on keys shared
with the other threads, so that per-key order is decided by commit order across threads (the
outbox's key lock; a transaction takes its keys' locks in key order, see `_run`). Some
transactions roll back: their events must never be delivered. Writers
talk to PostgreSQL directly, never through a fault proxy: the faults are the relay's.

The writers keep their own record of what they committed (`Writers.log`: per key, ids in
commit order), so that per-key order can be checked against something other than the
database's `seq`. Commit order per key is exact: a writer of a key waits (in the database,
for the key's lock) until the previous writer of that key committed, and each commit and its
log entry happen together under one lock (`_commit_lock`), so no later commit of the key can
be logged first. That lock serialises the writers' COMMITs (about a millisecond each here),
well within the rates the scenarios ask for; their statements still run concurrently.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence

import sqlalchemy as sa

import outbox
from outbox import Event, Outbox

#: Events per transaction, drawn uniformly from this range.
TRANSACTION_SIZE = (1, 8)


#: How a writer puts events into the outbox within the application's transaction on `conn`.
Write = Callable[[sa.Connection, Outbox, Sequence[Event]], None]


def write_in_transaction(conn: sa.Connection, box: Outbox, events: Sequence[Event]) -> None:
    """`outbox.write` on the application's connection: committed or rolled back with it."""
    outbox.write(conn, *events, outbox=box)


def log_of(events: Sequence[Event]) -> dict[str, list[str]]:
    """The write log (as `Writers.log`) of events committed in list order, one at a time."""
    log: dict[str, list[str]] = {}
    for event in events:
        if event.key is not None:
            log.setdefault(event.key, []).append(str(event.id))
    return log


def order_event(rng: random.Random, number: int, keys: int) -> Event:
    return Event(type="order.placed", key=f"k{rng.randrange(keys)}", payload={"n": number})


class Writers:
    """`threads` writers that together write `total` events (committed or rolled back).

    `rate` (events per second over all threads) spreads the writes over time, so that they
    overlap the faults of a test; None writes as fast as the database takes them.
    """

    def __init__(
        self,
        engine: sa.Engine,
        box: Outbox,
        *,
        total: int,
        keys: int,
        threads: int = 4,
        rate: float | None = None,
        rollback_share: float = 0.0,
        seed: int = 0,
        make_event: Callable[[random.Random, int, int], Event] = order_event,
        write: Write = write_in_transaction,
    ) -> None:
        self.engine = engine
        self.box = box
        self.total = total
        self.keys = keys
        self.rate = rate
        self.rollback_share = rollback_share
        self.make_event = make_event
        self.write = write
        self.committed = 0
        self.rolled_back: list[str] = []
        self.log: dict[str, list[str]] = {}  # key -> ids, in commit order
        self._commit_lock = threading.Lock()
        self.errors: list[BaseException] = []
        self._allocated = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started_at = 0.0
        self._threads = [
            threading.Thread(
                target=self._run, args=(random.Random(seed * 1000 + i),), name=f"writer-{i}"
            )
            for i in range(threads)
        ]

    def __enter__(self) -> Writers:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop writing now (a transaction under way still ends) and wait for the threads."""
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def start(self) -> None:
        self._started_at = time.monotonic()
        for thread in self._threads:
            thread.start()

    @property
    def done(self) -> bool:
        return not any(thread.is_alive() for thread in self._threads)

    def join(self, timeout: float = 120.0) -> None:
        """Wait for every writer; re-raise the first error one of them met."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.errors:
            raise self.errors[0]
        assert self.done, f"writers did not finish within {timeout} s"

    def _log(self, events: Sequence[Event]) -> None:
        with self._lock:
            self.committed += len(events)
            for event in events:
                if event.key is not None:  # keyless events have no order to keep
                    self.log.setdefault(event.key, []).append(str(event.id))

    def _allocate(self, rng: random.Random) -> tuple[int, int] | None:
        with self._lock:
            if self._allocated >= self.total:
                return None
            size = min(rng.randint(*TRANSACTION_SIZE), self.total - self._allocated)
            first = self._allocated
            self._allocated += size
            return first, size

    def _run(self, rng: random.Random) -> None:
        try:
            while not self._stop.is_set():
                batch = self._allocate(rng)
                if batch is None:
                    return
                first, size = batch
                if self.rate:
                    # Pacing, not synchronisation: event `first` is due at first / rate.
                    delay = self._started_at + first / self.rate - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        return
                events = [self.make_event(rng, first + i, self.keys) for i in range(size)]
                # Rows are inserted in key order (stable: a key's own events keep theirs): the
                # outbox's per-key locks, taken in different orders by two transactions,
                # deadlock (PostgreSQL then aborts one of them).
                events.sort(key=lambda event: event.key or "")
                rollback = rng.random() < self.rollback_share
                with self.engine.connect() as conn:
                    self.write(conn, self.box, events)
                    if rollback:
                        conn.rollback()
                        with self._lock:
                            self.rolled_back.extend(str(e.id) for e in events)
                        continue
                    with self._commit_lock:
                        conn.commit()
                        self._log(events)
        except BaseException as exc:  # surfaced by join(), not lost in the thread
            self.errors.append(exc)
