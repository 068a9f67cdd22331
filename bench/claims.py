"""Claims: fairness behind a big key, database work per event, claims with several relays.

* fairness: one event on each of 50 keys, written behind a backlog of B events on one key
  (B = 100,000; also with the busy key's head dead, holding it), and the same 50 events with
  no backlog. The relay runs in this process; the 50 keys' messages go to a queue of their
  own, timed on arrival from the relay's start. Ratio = p99 behind the backlog / p99 alone
  (goal: at most 2).
* work per event: tuples the relay wrote (inserted, updated, deleted in the outbox tables,
  from `pg_stat_user_tables`) per delivered event, 20,000 events over 100 keys (goal: at most
  1.2). The writers' own inserts happen before the relay starts and are not counted.
* claims with relays: claims per second by 1, 2 and 4 claimer processes on a backlog over
  many keys (claims only, nothing published or freed), against 1 claimer in the same run.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import threading
import time
from typing import Any

import pika
import sqlalchemy as sa

from bench.broker import open_connection
from bench.common import (
    bench_events,
    create_engine,
    median,
    percentile,
    progress,
    relay_settings,
    run_relay_until_empty,
    temporary_outbox,
)
from bench.config import BenchConfig
from outbox import Event, Outbox
from relay.app import build_relay
from relay.records import Failure
from relay.store import Store
from tests.support.rabbit import unique_name
from tests.support.relays import write_events

SMALL_KEYS = 50


def run(config: BenchConfig) -> dict[str, Any]:
    engine = create_engine(config.database_url, pool_size=4)
    try:
        fairness = {shape: _fairness(config, engine, shape) for shape in ("busy", "dead_head")}
        work = _work_per_event(config, engine)
        scaling = _claims_with_relays(config, engine)
    finally:
        engine.dispose()
    return {"fairness": fairness, "work_per_event": work, "claims_with_relays": scaling}


# -- fairness -----------------------------------------------------------------------------------


def _fairness(config: BenchConfig, engine: sa.Engine, shape: str) -> dict[str, Any]:
    ratios: list[float] = []
    alone: list[float] = []
    behind: list[float] = []
    for repeat in range(config.repeat):
        quiet = _small_keys_p99(config, engine, backlog=0, dead_head=False)
        busy = _small_keys_p99(
            config, engine, backlog=config.fairness_backlog, dead_head=shape == "dead_head"
        )
        alone.append(quiet)
        behind.append(busy)
        ratios.append(busy / quiet)
        progress(
            f"claims fairness ({shape}) {repeat + 1}/{config.repeat}: p99 of {SMALL_KEYS} keys "
            f"{quiet * 1000:.0f} ms alone, {busy * 1000:.0f} ms behind "
            f"{config.fairness_backlog:,} events on one key: ratio {ratios[-1]:.2f}"
        )
    return {
        "backlog": config.fairness_backlog,
        "p99_alone": median(alone),
        "p99_behind_backlog": median(behind),
        "ratio": median(ratios),
    }


def _small_keys_p99(
    config: BenchConfig, engine: sa.Engine, *, backlog: int, dead_head: bool
) -> float:
    with temporary_outbox(engine, "bench_fair") as box:
        if dead_head:
            write_events(engine, box, [Event(type="busy.event", key="busy")])
            _kill_head(engine, box)
        if backlog:
            _insert_backlog(engine, box, backlog)
        write_events(
            engine, box, [Event(type="small.event", key=f"s{i}") for i in range(SMALL_KEYS)]
        )
        arrivals = _time_small_arrivals(config, box)
    arrivals.sort()
    value = percentile(arrivals, 0.99)
    assert value is not None
    return value


def _kill_head(engine: sa.Engine, box: Outbox) -> None:
    """The busy key's first event dies, as after its last attempt: it holds the key."""
    store = Store(engine, box, db_timeout=30)
    moment = dt.datetime.now(dt.UTC)
    claim = store.claim(owner="bench", limit=1, run_length=1, lease_until=moment, now=moment)
    failure = Failure(event=claim.events[0], error="bench: dead head", next_attempt_at=None)
    store.record_failures(claim.token, [failure], relay="bench", now=moment)


def _insert_backlog(engine: sa.Engine, box: Outbox, count: int) -> None:
    """`count` events of key "busy" in one statement (the triggers still number them)."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f'INSERT INTO "{box.schema}"."{box.name}" '
                "(id, type, key, routing_key, payload, occurred_at) "
                "SELECT gen_random_uuid(), 'busy.event', 'busy', 'busy.event', '{}', now() "
                "FROM generate_series(1, :count)"
            ),
            {"count": count},
        )
        conn.exec_driver_sql(f'ANALYZE "{box.schema}"."{box.name}"')


def _time_small_arrivals(config: BenchConfig, box: Outbox) -> list[float]:
    """Run the relay until the 50 small keys' events arrived; seconds from its start."""
    exchange, small, sink = (unique_name(f"bench-fair-{n}") for n in ("ex", "small", "sink"))
    connection = open_connection(config.amqp_url, f"{small}-consumer")
    channel = connection.channel()
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    for queue, pattern in ((small, "small.#"), (sink, "busy.#")):
        channel.queue_declare(queue, durable=False, auto_delete=False)
        channel.queue_bind(queue, exchange, routing_key=pattern)
    settings = relay_settings(config.database_url, config.amqp_url, box, exchange)
    relay = build_relay(settings)
    thread = threading.Thread(target=relay.run, daemon=True)
    arrivals: list[float] = []
    try:
        started = time.monotonic()
        thread.start()
        deadline = started + 120
        for method, _props, _body in channel.consume(small, inactivity_timeout=1.0):
            if method is not None:
                arrivals.append(time.monotonic() - started)
                channel.basic_ack(method.delivery_tag)
            if len(arrivals) >= SMALL_KEYS or time.monotonic() > deadline:
                break
        channel.cancel()
    finally:
        relay.request_stop()
        thread.join(60)
        relay.store.engine.dispose()
        for queue in (small, sink):
            channel.queue_delete(queue)
        channel.exchange_delete(exchange)
        connection.close()
    if len(arrivals) < SMALL_KEYS:
        raise RuntimeError(f"fairness: only {len(arrivals)} of {SMALL_KEYS} small keys arrived")
    return arrivals


# -- work per event -------------------------------------------------------------------------------


def _work_per_event(config: BenchConfig, engine: sa.Engine) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    for repeat in range(config.repeat):
        with temporary_outbox(engine, "bench_work") as box:
            write_events(engine, box, bench_events(config.n, config.work_keys, config.body_size))
            engine.dispose()  # a backend reports its counters for sure when it exits
            before = _tuples_written(engine, box)
            exchange = unique_name("bench-work-ex")
            queue = unique_name("bench-work-q")
            _declare(config.amqp_url, exchange, queue)
            try:
                settings = relay_settings(config.database_url, config.amqp_url, box, exchange)
                relay_run = run_relay_until_empty(settings)
            finally:
                _delete(config.amqp_url, exchange, queue)
            after = _tuples_written(engine, box)
        written = {table: after[table] - before[table] for table in after}
        per_event = sum(written.values()) / max(1, relay_run.events)
        results.append({"events": relay_run.events, "tuples": written, "per_event": per_event})
        progress(
            f"claims work {repeat + 1}/{config.repeat}: {relay_run.events:,} events, "
            f"{sum(written.values()):,} tuples written by the relay: {per_event:.3f} per event"
        )
    return {
        "keys": config.work_keys,
        "n": config.n,
        "per_event": median([r["per_event"] for r in results]),
        "runs": results,
    }


def _tuples_written(engine: sa.Engine, box: Outbox) -> dict[str, int]:
    """Inserted + updated + deleted tuples per outbox table, as the statistics say. Waits for
    the counters to settle: backends report them at most once a second, and at exit (the
    caller closes its connections first; the relay closes its own when it stops)."""
    names = [table.name for table in box.tables]
    last: dict[str, int] | None = None
    for _ in range(20):
        time.sleep(0.6)
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables "
                    "WHERE schemaname = :schema AND relname = ANY(:names)"
                ),
                {"schema": box.schema, "names": names},
            ).all()
        engine.dispose()
        counts = {name: 0 for name in names} | {name: int(count) for name, count in rows}
        if counts == last:
            return counts
        last = counts
    assert last is not None
    return last


def _declare(amqp_url: str, exchange: str, queue: str) -> None:
    connection = open_connection(amqp_url, f"{queue}-setup")
    try:
        channel = connection.channel()
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        channel.queue_declare(queue)
        channel.queue_bind(queue, exchange, routing_key="#")
    finally:
        connection.close()


def _delete(amqp_url: str, exchange: str, queue: str) -> None:
    connection = open_connection(amqp_url, f"{queue}-cleanup")
    try:
        channel = connection.channel()
        channel.queue_delete(queue)
        channel.exchange_delete(exchange)
    except pika.exceptions.AMQPError:
        pass
    finally:
        connection.close()


# -- claims with several relays -------------------------------------------------------------------


def _claims_with_relays(config: BenchConfig, engine: sa.Engine) -> dict[str, Any]:
    per_count: dict[int, list[float]] = {n: [] for n in config.claimers}
    for repeat in range(config.repeat):
        for claimers in config.claimers:
            with temporary_outbox(engine, "bench_claims") as box:
                events = [
                    Event(type="t", key=f"k{i % config.claim_keys}")
                    for i in range(config.claim_backlog)
                ]
                write_events(engine, box, events, per_transaction=5000)
                rate = _claim_rate(config, box, claimers)
            per_count[claimers].append(rate)
            progress(
                f"claims with {claimers} relays {repeat + 1}/{config.repeat}: {rate:,.0f} claims/s"
            )
    rates = {n: median(values) for n, values in per_count.items()}
    one = rates.get(1) or 0.0
    return {
        "backlog": config.claim_backlog,
        "keys": config.claim_keys,
        "claims_per_second": {str(n): rate for n, rate in rates.items()},
        "ratio_to_one": {str(n): (rate or 0.0) / one if one else None for n, rate in rates.items()},
    }


def _claim_rate(config: BenchConfig, box: Outbox, claimers: int) -> float:
    assert box.schema is not None
    start = multiprocessing.get_context("spawn").Event()
    counts = multiprocessing.get_context("spawn").Queue()
    processes = [
        multiprocessing.get_context("spawn").Process(
            target=_claimer,
            args=(config.database_url, box.schema, start, counts, config.claim_seconds),
        )
        for _ in range(claimers)
    ]
    for process in processes:
        process.start()
    time.sleep(2.0)  # imports and connections, outside the measured time
    start.set()
    total = sum(counts.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(30)
    return total / config.claim_seconds


def _claimer(database_url: str, schema: str, start: Any, counts: Any, seconds: float) -> None:
    engine = create_engine(database_url, pool_size=1)
    store = Store(engine, Outbox(schema=schema), db_timeout=30)
    start.wait(60)
    done = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        moment = dt.datetime.now(dt.UTC)
        claim = store.claim(
            owner="bench",
            limit=100,
            run_length=10,
            lease_until=moment + dt.timedelta(minutes=10),
            now=moment,
        )
        if claim.events:
            done += 1
            # Give the keys back (their events stay pending), as a relay does when a run ends:
            # the backlog never runs out, however fast the claims are (it did once a single
            # relay made more than 333 claims/s: every key was leased within the run).
            keys = {e.key for e in claim.events if e.key is not None}
            store.free_keys({claim.token: keys}, now=dt.datetime.now(dt.UTC))
    engine.dispose()
    counts.put(done)
