"""`outbox-relay run` as real processes: several at once, killed, stopped."""

from __future__ import annotations

import signal

import pytest
import sqlalchemy as sa

from outbox import Outbox
from relay.admin import Admin
from tests.support.history import check_history
from tests.support.rabbit import QueueTap, bytes_received_from, unique_name
from tests.support.relays import (
    count_by_status,
    drain_distinct,
    interleaved_events,
    start_relay_process,
    stop_process,
    write_events,
    written,
)

FAST = ["--poll-interval", "0.2s", "--lease", "3s"]


def _leased(engine: sa.Engine, box: Outbox) -> int:
    """Pending rows a relay holds a lease on, as `outbox-relay status` reports them."""
    return Admin(engine, box).status().in_flight


@pytest.mark.timeout(180)
def test_four_relay_processes_share_the_work_and_keep_key_order(
    pg_engine: sa.Engine,
    pg_url: str,
    amqp_url: str,
    outbox_schema: Outbox,
    tapped_exchange: tuple[QueueTap, str],
) -> None:
    assert outbox_schema.schema is not None
    tap, exchange = tapped_exchange
    write_events(pg_engine, outbox_schema, interleaved_events(20_000, keys=100))
    names = [unique_name(f"relay-{n}") for n in "abcd"]
    relays = [
        start_relay_process(
            database_url=pg_url,
            amqp_url=amqp_url,
            schema=outbox_schema.schema,
            exchange=exchange,
            name=name,
            # Small claims, so that every relay finds free keys.
            extra=[*FAST, "--batch-size", "100", "--run-length", "10"],
        )
        for name in names
    ]
    try:
        deliveries = tap.drain(expected=20_000, timeout=60)
        # Every relay published: each connection carried far more than its handshake and
        # declarations (under 2 kB); 20 kB is some 60 messages, of 20,000 (about 6 MB).
        received = {name: bytes_received_from(f"outbox-relay:{name}") for name in names}
    finally:
        results = [stop_process(p) for p in relays]
    for code, output in results:
        assert code == 0, output
    check_history(written(pg_engine, outbox_schema), deliveries).assert_ok()
    assert all(n > 20_000 for n in received.values()), f"bytes each relay sent: {received}"
    assert count_by_status(pg_engine, outbox_schema) == {"published": 20_000}
    t = outbox_schema.events
    with pg_engine.connect() as conn:
        publishers = set(conn.scalars(sa.select(t.c.claimed_by).distinct()))
    assert publishers == set(names)  # each event records the relay that published it


def test_sigkilled_relay_loses_nothing_after_restart(
    pg_engine: sa.Engine,
    pg_url: str,
    amqp_url: str,
    outbox_schema: Outbox,
    tapped_exchange: tuple[QueueTap, str],
) -> None:
    assert outbox_schema.schema is not None
    tap, exchange = tapped_exchange
    # Enough that the relay is still at it when the tap has seen the first 1,500 (it drains
    # about 10,000 a second; the tap, in the test's process, reads slower under load).
    write_events(pg_engine, outbox_schema, interleaved_events(30_000, keys=100))
    first = start_relay_process(
        database_url=pg_url,
        amqp_url=amqp_url,
        schema=outbox_schema.schema,
        exchange=exchange,
        name=unique_name("doomed"),
        extra=FAST,
    )
    tap.drain(expected=1_500, timeout=30)
    first.send_signal(signal.SIGKILL)  # mid-batch: rows leased, confirms in flight
    first.wait(10)
    stop_process(first)  # collects its output and closes the pipe
    assert _leased(pg_engine, outbox_schema) > 0
    second = start_relay_process(
        database_url=pg_url,
        amqp_url=amqp_url,
        schema=outbox_schema.schema,
        exchange=exchange,
        name=unique_name("successor"),
        extra=FAST,
    )
    try:
        # The killed relay's leased rows come back once its lease (3 s) runs out.
        deliveries = drain_distinct(tap, 30_000, timeout=90)
    finally:
        code, output = stop_process(second)
    assert code == 0, output
    report = check_history(written(pg_engine, outbox_schema), deliveries)
    report.assert_ok(max_duplicates=1000)  # at most the killed relay's in-flight window
    assert count_by_status(pg_engine, outbox_schema) == {"published": 30_000}


def test_sigterm_drains_and_exits_0_with_nothing_left_in_flight(
    pg_engine: sa.Engine,
    pg_url: str,
    amqp_url: str,
    outbox_schema: Outbox,
    tapped_exchange: tuple[QueueTap, str],
) -> None:
    assert outbox_schema.schema is not None
    tap, exchange = tapped_exchange
    write_events(pg_engine, outbox_schema, interleaved_events(20_000, keys=100))
    relay = start_relay_process(
        database_url=pg_url,
        amqp_url=amqp_url,
        schema=outbox_schema.schema,
        exchange=exchange,
        name=unique_name("term"),
        extra=FAST,
    )
    tap.drain(expected=1_000, timeout=30)
    # stop_process waits 20 s, then SIGKILLs: exit 0 means the drain ended in time.
    code, output = stop_process(relay)
    assert code == 0, output
    assert "draining" in output
    # Nothing stays leased: what was confirmed is recorded, the rest given back.
    assert _leased(pg_engine, outbox_schema) == 0
    deliveries = tap.drain(expected=20_001, timeout=2)
    published = count_by_status(pg_engine, outbox_schema).get("published", 0)
    # Every confirmed event was recorded as published, and nothing else was.
    assert published == len({d.message_id for d in deliveries})
    assert published < 20_000


def test_sigterm_before_the_signal_handler_exists_kills_the_relay_with_nothing_claimed(
    pg_engine: sa.Engine,
    pg_url: str,
    amqp_url: str,
    outbox_schema: Outbox,
    tapped_exchange: tuple[QueueTap, str],
) -> None:
    """The limit of the graceful stop: `outbox-relay run` installs its SIGTERM handler once
    Python has started and imported the relay (hundreds of ms). A SIGTERM sent the moment the
    process exists meets no handler: the process dies by the default action (exit -15), not
    by a drain. That is harmless, because the handler is in place before the relay opens any
    connection: nothing was claimed or published, and the next relay delivers everything."""
    assert outbox_schema.schema is not None
    tap, exchange = tapped_exchange
    write_events(pg_engine, outbox_schema, interleaved_events(200, keys=10))
    early = start_relay_process(
        database_url=pg_url,
        amqp_url=amqp_url,
        schema=outbox_schema.schema,
        exchange=exchange,
        name=unique_name("early"),
        extra=FAST,
    )
    early.send_signal(signal.SIGTERM)  # at once: long before Python reaches the handler
    code, output = stop_process(early)
    assert code == -signal.SIGTERM, f"exit {code}: {output}"
    status = Admin(pg_engine, outbox_schema).status()
    assert (status.pending, status.in_flight, status.published) == (200, 0, 0)
    assert tap.drain(expected=1, timeout=1) == []
    relay = start_relay_process(
        database_url=pg_url,
        amqp_url=amqp_url,
        schema=outbox_schema.schema,
        exchange=exchange,
        name=unique_name("next"),
        extra=FAST,
    )
    try:
        deliveries = tap.drain(expected=200, timeout=30)
    finally:
        code, output = stop_process(relay)
    assert code == 0, output
    check_history(written(pg_engine, outbox_schema), deliveries).assert_ok()
