"""Retries back off exponentially: each retry of a refused event waits about twice as long as
the one before, never longer than `--retry-max`, and the last attempt makes the event dead.

The relay runs on the real database with a clock the test controls: every failure it records
carries the time it was computed at (`now`) and its next attempt time, so the delay it chose
is read exactly, without timing anything. The clock moves to the next attempt time as soon as
a failure is recorded, and the relay's own claims then find the row due again. The broker is
a fake that refuses every message (an unroutable return, as far as the relay can tell).
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import sqlalchemy as sa

from outbox import Event, Outbox
from relay.app import build_store
from relay.deadline import Watchdog
from relay.messages import Outcome, Sink
from relay.records import Failure
from relay.relay import Relay
from relay.settings import RelaySettings
from tests.faults.runners import RelayThread
from tests.support.rabbit import unique_name
from tests.support.relays import write_events
from tests.unit.fakes import FakePublisher

RETRY_MIN, RETRY_MAX, MAX_ATTEMPTS = 1.0, 8.0, 8


def test_retry_delays_double_up_to_retry_max_then_the_event_is_dead(
    pg_engine: sa.Engine, pg_url: str, outbox_schema: Outbox
) -> None:
    settings = RelaySettings(
        database_url=pg_url,
        amqp_url="amqp://guest:guest@127.0.0.1:1/%2F",  # never used: the broker is a fake
        schema=outbox_schema.schema,
        name=unique_name("backoff"),
        retry_min=RETRY_MIN,
        retry_max=RETRY_MAX,
        max_attempts=MAX_ATTEMPTS,
        poll_interval=0.1,
        listen=False,
    )
    clock = [dt.datetime(2026, 1, 1, tzinfo=dt.UTC)]
    delays: dict[int, float | None] = {}  # attempt -> seconds until the next one (None: dead)
    dead = threading.Event()
    store = build_store(settings, watchdog=Watchdog())
    record_failures = store.record_failures

    def recorded(
        token: Any, failures: list[Failure], *, relay: str, now: dt.datetime, **more: Any
    ) -> int:
        written = record_failures(token, failures, relay=relay, now=now, **more)
        for failure in failures:
            due = failure.next_attempt_at
            delays[failure.attempt] = None if due is None else (due - now).total_seconds()
            if due is None:
                dead.set()
            else:
                clock[0] = max(clock[0], due)  # the retry is due: the relay claims it again
        return written

    store.record_failures = recorded  # type: ignore[method-assign,assignment]

    def refusing(sink: Sink) -> FakePublisher:
        publisher = FakePublisher(sink)
        publisher.decide = lambda message: Outcome.REJECTED
        publisher.auto_settle = True
        return publisher

    relay = Relay(settings, store, refusing, clock=lambda: clock[0])
    write_events(pg_engine, outbox_schema, [Event(type="order.placed", key="k")])
    with RelayThread(settings, relay=relay) as running:
        assert dead.wait(30), f"not dead after {MAX_ATTEMPTS} attempts; delays so far: {delays}"
        running.assert_running()

    assert list(delays) == list(range(1, MAX_ATTEMPTS + 1))
    assert delays[MAX_ATTEMPTS] is None  # the last attempt makes it dead
    for attempt in range(1, MAX_ATTEMPTS):
        # Doubling from retry_min, capped at retry_max; jitter takes up to half of it.
        ceiling = min(RETRY_MAX, RETRY_MIN * 2 ** (attempt - 1))
        delay = delays[attempt]
        assert delay is not None and ceiling / 2 <= delay <= ceiling, (attempt, delays)
    # Uncapped, attempts 5 to 7 would wait 8-16, 16-32 and 32-64 s.
    assert all(d is not None and d <= RETRY_MAX for d in delays.values() if d is not None)
    t = outbox_schema.events
    with pg_engine.connect() as conn:
        status, attempts = conn.execute(sa.select(t.c.status, t.c.attempts)).one()
    assert (status, attempts) == ("dead", MAX_ATTEMPTS)
