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
    """Hands out claimed events: per key in write order, at most `per_key` of a key
    unconfirmed at a time (1 by default: strict order, see the module docstring), at most
    `max_in_flight` in all.

    With `per_key` > 1 (`--max-in-flight-per-key`), a key's next events go out before the
    earlier ones are confirmed. Order then holds only while the broker accepts them: if it
    refuses one, the later events of that window may already be accepted, and reach
    consumers before the refused event's retry. Only events of one claim share a window: a
    key's new claim (after a stale one) waits until the old claim's events are settled.
    """

    def __init__(self, max_in_flight: int, per_key: int = 1) -> None:
        if per_key < 1:
            raise ValueError(f"per_key must be 1 or more, got {per_key}")
        self.max_in_flight = max_in_flight
        self.per_key = per_key
        self._runs: dict[str, deque[ClaimedEvent]] = {}  # queued, not yet handed out
        # Keys that may have an event to hand out (checked again when taken), in turn order;
        # `_ready` is the set of keys in that deque.
        self._ready_keys: deque[str] = deque()
        self._ready: set[str] = set()
        self._keyless: deque[ClaimedEvent] = deque()
        self._in_flight: dict[int, ClaimedEvent] = {}
        # key -> (token of its events in flight, how many)
        self._busy_keys: dict[str, tuple[uuid.UUID, int]] = {}
        self._queued = 0

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def queued(self) -> int:
        return self._queued

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
        busy = self._busy_keys.get(key)
        return busy is not None and token in (None, busy[0])

    def add(self, events: Iterable[ClaimedEvent]) -> list[ClaimedEvent]:
        """Queue claimed events; within a key they must come in write order.

        A claim can return a key this relay still has queued under an older claim: that
        claim's lease ran out in the database while the relay still held it (a lost commit,
        a clock that jumped, a pause). The older run is stale (its writes are fenced by the
        token) and is replaced by the new one, which queues behind whatever of the key is
        still in flight. Returns the stale events dropped from the queue.
        """
        stale: list[ClaimedEvent] = []
        for event in events:
            if event.key is None:
                self._keyless.append(event)
                self._queued += 1
                continue
            run = self._runs.get(event.key)
            if run and run[0].token != event.token:
                stale.extend(run)
                self._queued -= len(run)
                run.clear()
            if run is None:
                run = self._runs[event.key] = deque()
            elif run and run[-1].seq >= event.seq:
                raise ValueError(f"event {event.seq} of key {event.key!r} added out of order")
            run.append(event)
            self._queued += 1
            self._offer(event.key)
        return stale

    def _eligible(self, key: str) -> bool:
        """`key` has a queued head that may go out now."""
        run = self._runs.get(key)
        if not run:
            return False
        busy = self._busy_keys.get(key)
        return busy is None or (busy[0] == run[0].token and busy[1] < self.per_key)

    def _offer(self, key: str) -> None:
        if key not in self._ready and self._eligible(key):
            self._ready.add(key)
            self._ready_keys.append(key)

    def take(self, limit: int | None = None) -> list[ClaimedEvent]:
        """Hand out what may be published now, within the in-flight limits."""
        room = self.max_in_flight - len(self._in_flight)
        if limit is not None:
            room = min(room, limit)
        taken: list[ClaimedEvent] = []
        while room > 0 and (self._ready_keys or self._keyless):
            if self._ready_keys:
                key = self._ready_keys.popleft()
                self._ready.discard(key)
                if not self._eligible(key):
                    continue  # its run was withdrawn or replaced meanwhile
                run = self._runs[key]
                event = run.popleft()
                if not run:
                    del self._runs[key]
                busy = self._busy_keys.get(key)
                self._busy_keys[key] = (event.token, 1 if busy is None else busy[1] + 1)
                self._offer(key)  # room left in its window: back of the line
            else:
                event = self._keyless.popleft()
            self._queued -= 1
            self._in_flight[event.seq] = event
            taken.append(event)
            room -= 1
        return taken

    def _settled(self, event: ClaimedEvent) -> None:
        """One in-flight event of a key is no longer in flight."""
        assert event.key is not None
        busy = self._busy_keys.get(event.key)
        if busy is None:
            return
        if busy[1] <= 1:
            del self._busy_keys[event.key]
        else:
            self._busy_keys[event.key] = (busy[0], busy[1] - 1)

    def confirmed(self, seq: int) -> ClaimedEvent | None:
        """The broker confirmed `seq`: its key may go on. None if `seq` is not in flight here."""
        event = self._in_flight.pop(seq, None)
        if event is not None and event.key is not None:
            self._settled(event)
            self._offer(event.key)
        return event

    def stopped(self, seq: int) -> tuple[ClaimedEvent | None, list[ClaimedEvent]]:
        """`seq` was rejected or its fate is unknown: its key must wait for it.

        Returns the event and the rest of its key's queued run, which is withdrawn here (the
        caller gives those rows back to the database unattempted). Other events of the key
        in flight (a window of more than one) stay in flight: their outcomes still come.
        """
        event = self._in_flight.pop(seq, None)
        if event is None or event.key is None:
            return event, []
        self._settled(event)
        rest = list(self._runs.pop(event.key, ()))
        self._queued -= len(rest)
        return event, rest

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
        self._queued -= len(withdrawn)
        self._ready_keys = deque(k for k in self._ready_keys if k in self._runs)
        self._ready = set(self._ready_keys)
        return withdrawn

    def keyless_seqs(self) -> list[int]:
        """Events without a key queued or in flight here: their rows carry their own lease."""
        seqs = [e.seq for e in self._keyless]
        seqs.extend(e.seq for e in self._in_flight.values() if e.key is None)
        return seqs

    def in_flight_events(self) -> list[ClaimedEvent]:
        return list(self._in_flight.values())
