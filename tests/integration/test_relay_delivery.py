"""The relay on the real PostgreSQL and RabbitMQ: every committed event arrives, confirmed,
in per-key order, with its dedup id."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time

import sqlalchemy as sa

import outbox
from outbox import Event, Outbox
from relay.settings import RelaySettings
from tests.support.history import check_history
from tests.support.rabbit import QueueTap, close_connection_named, unique_name
from tests.support.relays import (
    count_by_status,
    drain_distinct,
    interleaved_events,
    relay_thread,
    write_events,
    written,
)


def settings_for(
    pg_url: str, amqp_url: str, box: Outbox, exchange: str, **kw: object
) -> RelaySettings:
    return RelaySettings(
        database_url=pg_url,
        amqp_url=amqp_url,
        schema=box.schema,
        exchange=exchange,
        name=unique_name("relay"),
        **kw,  # type: ignore[arg-type]
    )


def test_20000_events_over_100_keys_arrive_once_in_key_order(
    pg_engine: sa.Engine,
    pg_url: str,
    amqp_url: str,
    outbox_schema: Outbox,
    tapped_exchange: tuple[QueueTap, str],
) -> None:
    tap, exchange = tapped_exchange
    write_events(pg_engine, outbox_schema, interleaved_events(20_000, keys=100))
    with relay_thread(settings_for(pg_url, amqp_url, outbox_schema, exchange)):
        deliveries = tap.drain(expected=20_000, timeout=20)
    report = check_history(written(pg_engine, outbox_schema), deliveries)
    report.assert_ok(max_duplicates=0)
    assert count_by_status(pg_engine, outbox_schema) == {"published": 20_000}


def test_message_properties_on_the_wire(
    pg_engine: sa.Engine,
    pg_url: str,
    amqp_url: str,
    outbox_schema: Outbox,
    tapped_exchange: tuple[QueueTap, str],
) -> None:
    event = Event(
        type="order.placed",
        aggregate_type="order",
        aggregate_id=42,
        payload={"total": "9.99"},
        headers={"tenant": "acme"},
        correlation_id="req-1",
        version=2,
    )
    tap, exchange = tapped_exchange
    write_events(pg_engine, outbox_schema, [event])
    with relay_thread(settings_for(pg_url, amqp_url, outbox_schema, exchange)):
        tap.drain(expected=1, timeout=10)
    ((method, props, body),) = tap.raw
    assert method.routing_key == "order.placed"
    assert props.message_id == str(event.id)
    assert props.type == "order.placed"
    assert props.delivery_mode == 2
    assert props.content_type == "application/json"
    assert props.correlation_id == "req-1"
    assert props.timestamp == int(event.occurred_at.timestamp())
    assert props.headers["ordering-key"] == "order:42"
    assert props.headers["aggregate-type"] == "order"
    assert props.headers["aggregate-id"] == "42"
    assert props.headers["event-version"] == 2
    assert props.headers["tenant"] == "acme"
    assert json.loads(body) == {"total": "9.99"}


def test_late_commit_is_delivered_in_write_order(
    pg_engine: sa.Engine,
    pg_url: str,
    amqp_url: str,
    outbox_schema: Outbox,
    tapped_exchange: tuple[QueueTap, str],
) -> None:
    """T1 writes the first event of key k and commits late; T2 writes the second meanwhile
    and is blocked behind T1 on k's lock (seen in pg_locks, not assumed after a sleep). The
    relay runs all along and claims again while T2 waits; k's events still arrive in write
    order, and nothing of k before T1's commit."""
    tap, exchange = tapped_exchange
    with relay_thread(settings_for(pg_url, amqp_url, outbox_schema, exchange)):
        first = pg_engine.connect()
        first_event = Event(type="x.first", key="k")
        outbox.write(first, first_event, outbox=outbox_schema)
        first_pid = first.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        second_event = Event(type="x.second", key="k")
        second_pid: list[int] = []
        errors: list[BaseException] = []

        def second_writer() -> None:
            try:
                with pg_engine.begin() as conn:
                    second_pid.append(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar())
                    outbox.write(conn, second_event, outbox=outbox_schema)
            except BaseException as exc:  # surfaced below, not lost in the thread
                errors.append(exc)

        writer = threading.Thread(target=second_writer)
        writer.start()
        blocked_by = wait_until_blocked(pg_engine, second_pid, timeout=10)
        assert first_pid in blocked_by, f"T2 waits for {blocked_by}, not for T1 ({first_pid})"
        assert lock_waits(pg_engine, second_pid[0]) == ["advisory"], "T2 waits, but not on k"
        # While T2 waits, the relay claims and publishes other keys: a claim ran meanwhile.
        write_events(pg_engine, outbox_schema, [Event(type="x.other", key="other")])
        assert len(tap.drain(expected=1, timeout=10)) == 1
        assert writer.is_alive() and lock_waits(pg_engine, second_pid[0]) == ["advisory"]
        first.commit()
        first.close()
        writer.join(10)
        assert not errors and not writer.is_alive()
        deliveries = tap.drain(expected=3, timeout=10)
    k = [d.message_id for d in deliveries if d.key == "k"]
    assert k == [str(first_event.id), str(second_event.id)]
    assert deliveries[0].key == "other"
    check_history(written(pg_engine, outbox_schema), deliveries).assert_ok()


def wait_until_blocked(engine: sa.Engine, pid: list[int], timeout: float) -> list[int]:
    """Wait until the session `pid[0]` (filled in by its thread) waits for a lock; returns
    the sessions blocking it (pg_blocking_pids)."""
    deadline = time.monotonic() + timeout
    while True:
        if pid:
            with engine.connect() as conn:
                blockers = conn.execute(
                    sa.text("SELECT pg_blocking_pids(:pid)"), {"pid": pid[0]}
                ).scalar_one()
            if blockers:
                return list(blockers)
        assert time.monotonic() < deadline, f"the second writer was not blocked in {timeout} s"
        time.sleep(0.02)  # polling pg_locks: there is nothing to wait on


def lock_waits(engine: sa.Engine, pid: int) -> list[str]:
    """The kinds of lock `pid` is waiting for (pg_locks rows not granted)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT locktype FROM pg_locks WHERE pid = :pid AND NOT granted"),
            {"pid": pid},
        )
        return [r[0] for r in rows]


def test_rolled_back_events_are_never_published(
    pg_engine: sa.Engine,
    pg_url: str,
    amqp_url: str,
    outbox_schema: Outbox,
    tapped_exchange: tuple[QueueTap, str],
) -> None:
    tap, exchange = tapped_exchange
    with relay_thread(settings_for(pg_url, amqp_url, outbox_schema, exchange)):
        with pg_engine.connect() as conn:
            doomed = outbox.write(conn, Event(type="x.doomed", key="k"), outbox=outbox_schema)
            conn.rollback()
        write_events(pg_engine, outbox_schema, [Event(type="x.kept", key="k")])
        deliveries = tap.drain(expected=2, timeout=3)
    report = check_history(
        written(pg_engine, outbox_schema), deliveries, rolled_back=[str(i) for i in doomed]
    )
    report.assert_ok()
    assert len(deliveries) == 1


def test_broker_connection_closed_mid_run_loses_nothing_and_keeps_order(
    pg_engine: sa.Engine,
    pg_url: str,
    amqp_url: str,
    outbox_schema: Outbox,
    tapped_exchange: tuple[QueueTap, str],
) -> None:
    tap, exchange = tapped_exchange
    settings = settings_for(pg_url, amqp_url, outbox_schema, exchange)
    write_events(pg_engine, outbox_schema, interleaved_events(10_000, keys=100))
    with relay_thread(settings):
        tap.drain(expected=2_000, timeout=20)
        closed = 0
        deadline = time.monotonic() + 10
        while not closed and time.monotonic() < deadline:
            closed = close_connection_named(f"outbox-relay:{settings.name}")
        assert closed == 1
        deliveries = drain_distinct(tap, 10_000, timeout=60)
    report = check_history(written(pg_engine, outbox_schema), deliveries)
    # A cut connection may duplicate what was in flight; never more than the window.
    report.assert_ok(max_duplicates=settings.max_in_flight)
    assert count_by_status(pg_engine, outbox_schema) == {"published": 10_000}


def test_events_written_while_running_arrive_quickly(
    pg_engine: sa.Engine,
    pg_url: str,
    amqp_url: str,
    outbox_schema: Outbox,
    tapped_exchange: tuple[QueueTap, str],
) -> None:
    """LISTEN/NOTIFY: an idle relay (long poll interval) wakes at commit.

    The idle poll backs off, doubling (10 ms, 20 ms, ... up to the poll interval). The test
    watches the relay's idle probes (`Store.has_ready`) until two of them are at least 2.5 s
    apart; the next probe is then at least 5 s after the last one. An event committed right
    then and delivered well before that was delivered because of its notification."""
    tap, exchange = tapped_exchange
    settings = settings_for(pg_url, amqp_url, outbox_schema, exchange, poll_interval=30.0)
    with relay_thread(settings) as relay:
        probes: list[float] = []
        has_ready = relay.store.has_ready

        def probe(now: dt.datetime) -> bool:
            probes.append(time.monotonic())
            return has_ready(now)

        relay.store.has_ready = probe  # type: ignore[method-assign]
        deadline = time.monotonic() + 30
        while not (len(probes) >= 2 and probes[-1] - probes[-2] >= 2.5):
            assert time.monotonic() < deadline, f"the idle poll never backed off: {probes}"
            time.sleep(0.05)  # polling the spy: there is nothing to wait on
        next_poll = probes[-1] + 5.0
        write_events(pg_engine, outbox_schema, [Event(type="x.y", key="k")])
        assert len(tap.drain(expected=1, timeout=5)) == 1
        assert time.monotonic() < next_poll, "delivered no sooner than the next poll"
        assert relay._listener is not None
        assert relay._listener.notifications_total >= 1  # type: ignore[attr-defined]


def test_a_window_per_key_keeps_key_order_while_the_broker_accepts_everything(
    pg_engine: sa.Engine,
    pg_url: str,
    amqp_url: str,
    outbox_schema: Outbox,
    tapped_exchange: tuple[QueueTap, str],
) -> None:
    """--max-in-flight-per-key 8 over 10 keys: several messages of a key unconfirmed at once
    on one channel, which the broker routes in the order they were sent."""
    tap, exchange = tapped_exchange
    write_events(pg_engine, outbox_schema, interleaved_events(5000, keys=10))
    settings = settings_for(pg_url, amqp_url, outbox_schema, exchange, max_in_flight_per_key=8)
    with relay_thread(settings):
        deliveries = tap.drain(expected=5000, timeout=20)
    check_history(written(pg_engine, outbox_schema), deliveries).assert_ok(max_duplicates=0)


def test_a_window_per_key_lets_what_followed_a_refused_message_through(
    pg_engine: sa.Engine,
    pg_url: str,
    amqp_url: str,
    outbox_schema: Outbox,
    tapped_exchange: tuple[QueueTap, str],
) -> None:
    """The weaker promise, exactly: the 2nd of six events of a key is refused for good (a
    header RabbitMQ would close the channel on). The 3rd and 4th were in its window and
    arrive; the 5th and 6th had not gone out and wait behind the dead letter, which holds
    the key as always."""
    tap, exchange = tapped_exchange
    events = [Event(type="t", key="a", headers={"CC": "oops"} if i == 1 else {}) for i in range(6)]
    write_events(pg_engine, outbox_schema, events)
    settings = settings_for(
        pg_url, amqp_url, outbox_schema, exchange, max_in_flight_per_key=4, run_length=6
    )
    with relay_thread(settings):
        deliveries = tap.drain(expected=3, timeout=5)
        time.sleep(1.0)
        deliveries = tap.drain(expected=4, timeout=0.5)
    ids = [str(e.id) for e in events]
    assert [d.message_id for d in deliveries] == [ids[0], ids[2], ids[3]]
    t = outbox_schema.events
    with pg_engine.connect() as conn:
        status = dict(conn.execute(sa.select(t.c.id, t.c.status)).all())
    assert [status[e.id] for e in events] == [
        "published",
        "dead",
        "published",
        "published",
        "pending",
        "pending",
    ]
