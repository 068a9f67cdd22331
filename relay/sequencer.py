"""Per-key order in memory: the next event of a key is handed out only after the previous one
is confirmed.

With one event per key in flight, a rejected or lost event can never be overtaken by a later
event of its key: a broker may accept message 2 after refusing message 1 (a return for an
unroutable routing key, a nack from a full queue), so pipelining one key would reorder it.
Throughput comes from many keys in flight at once. Events without a key are independent.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Iterable

from relay.records import ClaimedEvent


class Sequencer:
    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self._runs: dict[str, deque[ClaimedEvent]] = {}  # queued, not yet handed out
        self._ready_keys: deque[str] = deque()  # keys with a queued head and nothing in flight
        self._keyless: deque[ClaimedEvent] = deque()
        self._in_flight: dict[int, ClaimedEvent] = {}
        self._busy_keys: dict[str, uuid.UUID] = {}  # key -> token of its event in flight

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def queued(self) -> int:
        return len(self._keyless) + sum(len(run) for run in self._runs.values())

    def has_queued(self, key: str) -> bool:
        return key in self._runs

    @property
    def idle(self) -> bool:
        return not self._in_flight and not self._keyless and not self._runs

    def tokens(self) -> set[uuid.UUID]:
        """Claims that still have events queued or in flight here."""
        tokens = {e.token for e in self._in_flight.values()}
        tokens.update(e.token for e in self._keyless)
        for run in self._runs.values():
            tokens.update(e.token for e in run)
        return tokens

    def busy(self, key: str, token: uuid.UUID | None = None) -> bool:
        """An event of `key` (of the claim `token`, if given) is in flight here."""
        return key in self._busy_keys and token in (None, self._busy_keys[key])

    def add(self, events: Iterable[ClaimedEvent]) -> list[ClaimedEvent]:
        """Queue claimed events; within a key they must come in write order.

        A claim can return a key this relay still has queued under an older claim: that
        claim's lease ran out in the database while the relay still held it (a lost commit,
        a clock that jumped, a pause). The older run is stale (its writes are fenced by the
        token) and is replaced by the new one, which queues behind whatever of the key is
        still in flight, so one event per key stays in flight. Returns the stale events
        dropped from the queue.
        """
        stale: list[ClaimedEvent] = []
        for event in events:
            if event.key is None:
                self._keyless.append(event)
                continue
            run = self._runs.get(event.key)
            if run and run[0].token != event.token:
                stale.extend(run)
                run.clear()
            if run is None:
                run = self._runs[event.key] = deque()
                if event.key not in self._busy_keys:
                    self._ready_keys.append(event.key)
            elif run and run[-1].seq >= event.seq:
                raise ValueError(f"event {event.seq} of key {event.key!r} added out of order")
            run.append(event)
        return stale

    def take(self, limit: int | None = None) -> list[ClaimedEvent]:
        """Hand out what may be published now, within the in-flight limit."""
        room = self.max_in_flight - len(self._in_flight)
        if limit is not None:
            room = min(room, limit)
        taken: list[ClaimedEvent] = []
        while room > 0 and (self._ready_keys or self._keyless):
            if self._ready_keys:
                key = self._ready_keys.popleft()
                run = self._runs[key]
                event = run.popleft()
                if not run:
                    del self._runs[key]
                self._busy_keys[key] = event.token
            else:
                event = self._keyless.popleft()
            self._in_flight[event.seq] = event
            taken.append(event)
            room -= 1
        return taken

    def confirmed(self, seq: int) -> ClaimedEvent | None:
        """The broker confirmed `seq`: its key may go on. None if `seq` is not in flight here."""
        event = self._in_flight.pop(seq, None)
        if event is not None and event.key is not None:
            self._busy_keys.pop(event.key, None)
            if event.key in self._runs:
                self._ready_keys.append(event.key)
        return event

    def stopped(self, seq: int) -> tuple[ClaimedEvent | None, list[ClaimedEvent]]:
        """`seq` was rejected or its fate is unknown: its key must wait for it.

        Returns the event and the rest of its key's queued run, which is withdrawn here (the
        caller gives those rows back to the database unattempted).
        """
        event = self._in_flight.pop(seq, None)
        if event is None or event.key is None:
            return event, []
        self._busy_keys.pop(event.key, None)
        # The key was busy, so it cannot be among the ready keys: dropping its run is enough.
        return event, list(self._runs.pop(event.key, ()))

    def withdraw(self, token: uuid.UUID | None = None) -> list[ClaimedEvent]:
        """Take back queued (not in-flight) events: of one claim, or all of them."""
        withdrawn = [e for e in self._keyless if token is None or e.token == token]
        self._keyless = deque(e for e in self._keyless if token is not None and e.token != token)
        for key in list(self._runs):
            run = self._runs[key]
            keep = deque(e for e in run if token is not None and e.token != token)
            withdrawn.extend(e for e in run if token is None or e.token == token)
            if keep:
                self._runs[key] = keep
            else:
                del self._runs[key]
        self._ready_keys = deque(k for k in self._ready_keys if k in self._runs)
        return withdrawn

    def keyless_seqs(self) -> list[int]:
        """Events without a key queued or in flight here: their rows carry their own lease."""
        seqs = [e.seq for e in self._keyless]
        seqs.extend(e.seq for e in self._in_flight.values() if e.key is None)
        return seqs

    def in_flight_events(self) -> list[ClaimedEvent]:
        return list(self._in_flight.values())
