"""Deliberately broken relays and writers, to prove that the fault rig catches what it checks.

A checker that has never seen a violation may be unable to see one. Each mutant here breaks
one guarantee, built only at the product's stable seams (the `Sequencer` interface, `Store`'s
result writes, the `Publisher` protocol, the writer's connection), so the product itself stays
untouched. `tests/faults/test_mutants.py` runs each mutant and its correct twin through the same
scenario and the same checks: the twin must pass, the mutant must fail the named check.

| mutant | breaks | the rig must report |
| --- | --- | --- |
| `TwoInFlightPerKey` | one event per key in flight | reordered |
| `build_mark_on_publish` | marked published only after the ack | lost |
| `ignore_claim_tokens` | result writes fenced by the claim token | final status |
| `drop_every` | every event is published | lost |
| `write_outside_transaction` | rolled back means no row | unexpected |
"""

from __future__ import annotations

import datetime as dt
import functools
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

import outbox
from outbox import Event, Outbox
from relay.app import build_store
from relay.deadline import Watchdog
from relay.messages import (
    Outcome,
    OutgoingMessage,
    Publisher,
    PublishOutcome,
    Sink,
)
from relay.publisher import AmqpPublisher
from relay.records import Claim, ClaimedEvent
from relay.relay import Relay
from relay.sequencer import Sequencer
from relay.settings import RelaySettings
from relay.store import Store

PublisherWrapper = Callable[[Publisher, Sink], Publisher]


def build_relay_with(
    settings: RelaySettings,
    *,
    publisher: PublisherWrapper | None = None,
    store: Callable[[Store], None] | None = None,
) -> Relay:
    """A relay wired like `relay.app.build_relay` (without LISTEN: it polls), with its
    publisher wrapped by `publisher(real, sink)` and its store changed in place by `store`."""
    real_store = build_store(settings, watchdog=Watchdog())
    if store is not None:
        store(real_store)

    def factory(sink: Sink) -> Publisher:
        real = AmqpPublisher(
            settings.amqp_url,
            sink,
            connection_name=f"outbox-relay:{settings.name}",
            exchange=settings.exchange,
            exchange_type=settings.exchange_type,
            declare_exchange=settings.declare_exchange,
        )
        return real if publisher is None else publisher(real, sink)

    return Relay(settings, real_store, factory)


# -- two events per key in flight ---------------------------------------------------------------


class TwoInFlightPerKey:
    """A sequencer that lets two events of a key be in flight at once (pipelining).

    Built from two real `Sequencer`s: a key's events go to them alternately, and each keeps
    one event per key in flight, so together they keep two. When the broker refuses event 1
    of a key, event 2 is already on its way: the key is reordered.
    """

    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self._lanes = (Sequencer(max_in_flight), Sequencer(max_in_flight))
        self._added: dict[str | None, int] = defaultdict(int)

    def install(self, relay: Relay) -> Relay:
        assert isinstance(relay.sequencer, Sequencer), "the relay no longer has a Sequencer"
        relay.sequencer = self  # type: ignore[assignment]
        return relay

    @property
    def in_flight(self) -> int:
        return sum(lane.in_flight for lane in self._lanes)

    @property
    def queued(self) -> int:
        return sum(lane.queued for lane in self._lanes)

    @property
    def idle(self) -> bool:
        return all(lane.idle for lane in self._lanes)

    def has_queued(self, key: str) -> bool:
        return any(lane.has_queued(key) for lane in self._lanes)

    def tokens(self) -> set[uuid.UUID]:
        return self._lanes[0].tokens() | self._lanes[1].tokens()

    def busy(self, key: str, token: uuid.UUID | None = None) -> bool:
        return any(lane.busy(key, token) for lane in self._lanes)

    def keyless_seqs(self) -> list[int]:
        return [seq for lane in self._lanes for seq in lane.keyless_seqs()]

    def add(self, events: Iterable[ClaimedEvent]) -> list[ClaimedEvent]:
        stale: list[ClaimedEvent] = []
        for event in events:
            lane = self._added[event.key] % 2
            self._added[event.key] += 1
            stale += self._lanes[lane].add([event])
        return stale

    def take(self, limit: int | None = None) -> list[ClaimedEvent]:
        room = self.max_in_flight - self.in_flight
        if limit is not None:
            room = min(room, limit)
        taken: list[ClaimedEvent] = []
        for lane in self._lanes:
            if room > 0:
                got = lane.take(room)
                taken.extend(got)
                room -= len(got)
        return taken

    def confirmed(self, seq: int) -> ClaimedEvent | None:
        for lane in self._lanes:
            event = lane.confirmed(seq)
            if event is not None:
                return event
        return None

    def stopped(self, seq: int) -> tuple[ClaimedEvent | None, list[ClaimedEvent]]:
        for lane in self._lanes:
            event, rest = lane.stopped(seq)
            if event is not None:
                return event, rest
        return None, []

    def withdraw(self, token: uuid.UUID | None = None) -> list[ClaimedEvent]:
        return self._lanes[0].withdraw(token) + self._lanes[1].withdraw(token)

    def in_flight_events(self) -> list[ClaimedEvent]:
        return self._lanes[0].in_flight_events() + self._lanes[1].in_flight_events()


# -- claims, seen by a spy ----------------------------------------------------------------------


class ClaimLog:
    """Which claim token holds each row, as the claims of every spied store returned them:
    what a mutant needs to know, without reading the table's lease columns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._token: dict[int, uuid.UUID] = {}

    def spy(self, store: Store) -> None:
        real = store.claim

        @functools.wraps(real)
        def claim(**kwargs: Any) -> Claim:
            result = real(**kwargs)
            with self._lock:
                for event in result.events:
                    self._token[event.seq] = result.token
            return result

        store.claim = claim  # type: ignore[method-assign]

    def token(self, seq: int) -> uuid.UUID | None:
        with self._lock:
            return self._token.get(seq)


# -- marking published before the ack ----------------------------------------------------------


class _MarkOnPublish:
    """A publisher that records each message published as soon as it is handed over, before
    the broker's ack: a message lost with its connection is then never published again."""

    store: Store

    def __init__(self, real: Publisher, claims: ClaimLog) -> None:
        self._real = real
        self._claims = claims

    @property
    def ready(self) -> bool:
        return self._real.ready

    def start(self) -> None:
        self._real.start()

    def stop(self, timeout: float) -> None:
        self._real.stop(timeout)

    def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        by_token: dict[uuid.UUID, list[int]] = defaultdict(list)
        for message in messages:
            token = self._claims.token(message.tag)
            if token is not None:
                by_token[token].append(message.tag)
        now = dt.datetime.now(dt.UTC)
        for token, seqs in by_token.items():
            self.store.mark_published({token: seqs}, now=now, delete=False)
        self._real.publish(messages)


def build_mark_on_publish(settings: RelaySettings, claims: ClaimLog) -> Relay:
    wrappers: list[_MarkOnPublish] = []

    def wrap(real: Publisher, sink: Sink) -> Publisher:
        wrapper = _MarkOnPublish(real, claims)
        wrappers.append(wrapper)
        return wrapper

    relay = build_relay_with(settings, publisher=wrap, store=claims.spy)
    for wrapper in wrappers:
        wrapper.store = relay.store
    return relay


# -- result writes that ignore the claim token ---------------------------------------------------


def ignore_claim_tokens(claims: ClaimLog) -> Callable[[Store], None]:
    """Result writes (published, failed, released) that land on whichever claim holds the rows
    now, not only on the writer's own: a relay that lost its lease overwrites its successor.
    (The store's own fence is kept; the mutant hands it the current owner's token.)"""

    def mutate(store: Store) -> None:
        claims.spy(store)
        mark, fail, release = store.mark_published, store.record_failures, store.release
        mark_and_end = store.mark_and_end_runs

        def owner(seq: int, token: uuid.UUID) -> uuid.UUID:
            return claims.token(seq) or token

        def to_owners(acked: Mapping[uuid.UUID, Sequence[int]]) -> dict[uuid.UUID, list[int]]:
            groups: dict[uuid.UUID, list[int]] = defaultdict(list)
            for token, seqs in acked.items():
                for seq in seqs:
                    groups[owner(seq, token)].append(seq)
            return groups

        def mark_published(acked: Mapping[uuid.UUID, Sequence[int]], **kwargs: Any) -> int:
            return mark(to_owners(acked), **kwargs)

        def mark_and_end_runs(
            acked: Mapping[uuid.UUID, Sequence[int]], freed: Any, **kwargs: Any
        ) -> Any:
            return mark_and_end(to_owners(acked), freed, **kwargs)

        def record_failures(token: uuid.UUID, failures: Sequence[Any], **kwargs: Any) -> int:
            groups: dict[uuid.UUID, list[Any]] = defaultdict(list)
            for failure in failures:
                groups[owner(failure.event.seq, token)].append(failure)
            return sum(fail(t, group, **kwargs) for t, group in groups.items())

        def release_(token: uuid.UUID, seqs: Sequence[int]) -> int:
            groups: dict[uuid.UUID, list[int]] = defaultdict(list)
            for seq in seqs:
                groups[owner(seq, token)].append(seq)
            return sum(release(t, group) for t, group in groups.items())

        store.mark_published = mark_published  # type: ignore[method-assign,assignment]
        store.mark_and_end_runs = mark_and_end_runs  # type: ignore[method-assign]
        store.record_failures = record_failures  # type: ignore[method-assign,assignment]
        store.release = release_  # type: ignore[method-assign,assignment]

    return mutate


# -- a publisher that loses events -------------------------------------------------------------


def drop_every(n: int) -> PublisherWrapper:
    """A publisher that reports every `n`-th message confirmed without sending it."""

    def wrap(real: Publisher, sink: Sink) -> Publisher:
        return _Dropping(real, sink, n)

    return wrap


class _Dropping:
    def __init__(self, real: Publisher, sink: Sink, n: int) -> None:
        self._real = real
        self._sink = sink
        self._n = n
        self._count = 0
        self.dropped: list[str] = []

    @property
    def ready(self) -> bool:
        return self._real.ready

    def start(self) -> None:
        self._real.start()

    def stop(self, timeout: float) -> None:
        self._real.stop(timeout)

    def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        sent: list[OutgoingMessage] = []
        dropped: list[PublishOutcome] = []
        for message in messages:
            self._count += 1
            if self._count % self._n == 0:
                dropped.append(PublishOutcome(message.tag, Outcome.CONFIRMED))
                self.dropped.append(message.message_id)
            else:
                sent.append(message)
        if sent:
            self._real.publish(sent)
        if dropped:
            self._sink(dropped)


# -- a writer that is not part of the application's transaction ----------------------------------


def write_outside_transaction(conn: sa.Connection, box: Outbox, events: Sequence[Event]) -> None:
    """The classic outbox bug: the events are written on a connection of their own and
    committed at once, so they survive the application's rollback."""
    engine = conn.engine
    with engine.begin() as own:
        outbox.write(own, *events, outbox=box)
