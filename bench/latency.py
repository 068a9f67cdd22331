"""Latency: commit-to-delivery while an application writes at a steady rate, and the relay's
database queries per second once it is idle.

Three kinds of process, as in production, so that no GIL is shared between them:

* writers (child processes): one event per transaction through `outbox.write`, keys spread
  over 100, each commit paced on a fixed schedule (event j is due at start + j / rate; a
  writer that falls behind catches up without sleeping, so the schedule is open-loop). Each
  records when its commit returned. One process per `per_writer_rate` events/s: one
  connection commits (and waits for its fsync) only so fast.
* a consumer (a child process) on the relay's queue records when each message arrived.
* the relay, built by `relay.app.build_relay` and run in a thread of this process (so that
  `relay.store.queries_total` can be read).

Commit and arrival times are `time.monotonic()` in different processes: one system-wide
clock (CLOCK_MONOTONIC) on Linux. Latency = arrival - commit.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import multiprocessing.connection
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.synchronize import Event as EventType
from typing import Any

import sqlalchemy as sa

from bench.broker import BenchQueue, open_connection, watch_blocked
from bench.common import (
    EVENT_TYPE,
    add_counts,
    count_pending,
    counts_ok,
    create_engine,
    history_counts,
    median,
    payload,
    percentile,
    progress,
    relay_settings,
    temporary_outbox,
)
from bench.config import BenchConfig
from outbox import Event, Outbox
from relay.app import build_relay
from relay.relay import Relay
from relay.settings import RelaySettings
from tests.support.history import Delivery, check_history
from tests.support.relays import written

# (event id, index, commit returned at, commit was due at)
CommitRecord = tuple[str, int, float, float]
# (message_id, ordering key, seq, redelivered, arrived at)
Arrival = tuple[str, str | None, int, bool, float]

READY_TIMEOUT = 60.0


# A run during which the shared broker blocked publishers (someone's resource alarm) measures
# that alarm, not the relay: it is run again, at most this many times in all.
MAX_TRIES = 3


def run(config: BenchConfig) -> dict[str, Any]:
    runs = []
    for repeat in range(config.repeat):
        for attempt in range(1, MAX_TRIES + 1):
            with watch_blocked() as blocked:
                result = _one_run(config, repeat)
            result["broker_blocked"] = bool(blocked)
            if not blocked or attempt == MAX_TRIES:
                break
            progress("latency run disturbed by a broker resource alarm; running it again")
        runs.append(result)
    per_rate = []
    for index, rate in enumerate(config.rates):
        stats = [r["rates"][index] for r in runs]
        per_rate.append(
            {
                "rate": rate,
                **{
                    name: median([s[name] for s in stats if s[name] is not None])
                    for name in ("achieved_rate", "p50_ms", "p95_ms", "p99_ms", "max_ms")
                },
                "writers": stats[0]["writers"],
                "relay_queries_per_event": median([s["relay_queries_per_event"] for s in stats]),
                "samples": sum(s["samples"] for s in stats),
            }
        )
    counts: dict[str, int] = {}
    for r in runs:
        counts = add_counts(counts, r["correctness"])
    return {
        "rates": per_rate,
        "idle_queries_per_second": median([r["idle"]["per_second"] for r in runs]),
        "correctness": {**counts, "ok": counts_ok(counts)},
        "runs": runs,
    }


def _one_run(config: BenchConfig, repeat: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    engine = create_engine(config.database_url, pool_size=2)
    try:
        with (
            temporary_outbox(engine, "bench_lat") as box,
            BenchQueue(config.amqp_url, "bench-lat") as queue,
            arrivals_consumer(ctx, config.amqp_url, queue.queue) as collect,
        ):
            settings = relay_settings(config.database_url, config.amqp_url, box, queue.exchange)
            rates: list[dict[str, Any]] = []
            with _running_relay(settings) as relay:
                first = 0
                for rate in config.rates:
                    queries = relay.store.queries_total
                    records = _write_at_rate(ctx, config, box, rate, first)
                    first += len(records)
                    _wait_published(engine, box, timeout=60.0)
                    queries = relay.store.queries_total - queries
                    rates.append({"rate": rate, "records": records, "queries": queries})
                idle = _measure_idle(relay, config)
            arrivals = collect()
            truth = written(engine, box)
    finally:
        engine.dispose()
    arrived: dict[str, float] = {}
    deliveries: list[Delivery] = []
    for message_id, key, seq, redelivered, at in arrivals:
        deliveries.append(Delivery(message_id, key, seq, redelivered))
        arrived.setdefault(message_id, at)
    stats = [_latency_stats(config, r["rate"], r["records"], arrived) for r in rates]
    for s, r in zip(stats, rates, strict=True):
        s["relay_queries_per_event"] = round(r["queries"] / max(1, len(r["records"])), 3)
    for s in stats:
        progress(
            f"latency repeat {repeat + 1}/{config.repeat} at {s['rate']}/s "
            f"(achieved {s['achieved_rate']:,.0f}/s): p50 {_ms(s['p50_ms'])} "
            f"p95 {_ms(s['p95_ms'])} p99 {_ms(s['p99_ms'])} ms"
        )
    progress(
        f"idle: {idle['per_second']:.2f} queries/s ({idle['queries']} in {idle['seconds']:.1f} s)"
    )
    return {
        "rates": stats,
        "idle": idle,
        "correctness": history_counts(check_history(truth, deliveries)),
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _latency_stats(
    config: BenchConfig, rate: int, records: Sequence[CommitRecord], arrived: dict[str, float]
) -> dict[str, Any]:
    stats = commit_to_delivery(records, arrived, warmup=config.latency_warmup)
    return {
        "rate": rate,
        "writers": _writers_for(config, rate),
        **stats,
        "missing": sum(1 for event_id, *_ in records if event_id not in arrived),
    }


def commit_to_delivery(
    records: Sequence[CommitRecord], arrived: dict[str, float], *, warmup: float
) -> dict[str, Any]:
    """Milliseconds from each commit to its arrival (events due in the first `warmup`
    seconds left out), the rate the writers reached, and how far behind schedule they fell."""
    start = min(due for _, _, _, due in records)
    counted = sorted(
        (arrived[event_id] - committed) * 1000
        for event_id, _, committed, due in records
        if due - start >= warmup and event_id in arrived
    )
    span = max(committed for _, _, committed, _ in records) - start
    return {
        "events": len(records),
        "achieved_rate": round(len(records) / span, 1) if span > 0 else None,
        "max_lag_ms": round(max(c - d for _, _, c, d in records) * 1000, 1),
        "samples": len(counted),
        "p50_ms": _round(percentile(counted, 0.50)),
        "p95_ms": _round(percentile(counted, 0.95)),
        "p99_ms": _round(percentile(counted, 0.99)),
        "max_ms": _round(counted[-1] if counted else None),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _writers_for(config: BenchConfig, rate: int) -> int:
    return max(1, math.ceil(rate / config.per_writer_rate))


# -- the relay ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _running_relay(settings: RelaySettings) -> Iterator[Relay]:
    """The relay as a daemon (not until_empty) in a thread; stopped gracefully on exit."""
    relay = build_relay(settings)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            relay.run()
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="bench-relay", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15.0
        while not relay.publisher.ready:
            if errors or time.monotonic() > deadline:
                raise RuntimeError(f"the relay did not connect to the broker: {errors}")
            time.sleep(0.02)
        yield relay
    finally:
        relay.request_stop()
        thread.join(30)
        relay.store.engine.dispose()
    if thread.is_alive():
        raise RuntimeError("the relay did not stop within 30 s")
    if errors:
        raise errors[0]


def _wait_published(engine: sa.Engine, box: Outbox, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while count_pending(engine, box):
        if time.monotonic() > deadline:
            raise RuntimeError(f"events still pending {timeout} s after the writers stopped")
        time.sleep(0.05)


def _measure_idle(relay: Relay, config: BenchConfig) -> dict[str, Any]:
    """What the idle relay asks the database, after a warm-up (its poll backs off to
    poll_interval). `queries` is `relay.store.queries_total` (statements); transactions and
    pool checkouts are counted too, because each costs round trips of its own (BEGIN, COMMIT,
    and the pool's pre-ping) that no statement count shows."""
    time.sleep(config.idle_warmup)
    kinds: Counter[str] = Counter()
    checkouts = 0
    schema = relay.settings.schema or ""
    store = relay.store

    def statement(conn: Any, text: str) -> None:
        kinds[_statement_kind(text, schema)] += 1

    def checkout(*args: Any) -> None:
        nonlocal checkouts
        checkouts += 1

    before, transactions_before = store.queries_total, store.transactions_total
    started = time.monotonic()
    store.statement_observers.append(statement)
    sa.event.listen(store.engine, "checkout", checkout)
    try:
        time.sleep(config.idle_seconds)
    finally:
        sa.event.remove(store.engine, "checkout", checkout)
        store.statement_observers.remove(statement)
    elapsed = time.monotonic() - started
    queries = store.queries_total - before
    transactions = store.transactions_total - transactions_before
    return {
        "seconds": round(elapsed, 3),
        "queries": queries,
        "per_second": round(queries / elapsed, 3),
        "transactions_per_second": round(transactions / elapsed, 3),
        "pool_checkouts_per_second": round(checkouts / elapsed, 3),
        "by_statement": dict(kinds.most_common()),
    }


def _statement_kind(statement: str, schema: str) -> str:
    text = re.sub(r"\s+", " ", statement).replace(f"{schema}.", "")
    text = re.sub(r"outbox\.(\w+)", r"\1", text)
    return text[:72]


# -- writer processes --------------------------------------------------------------------------


def _write_at_rate(
    ctx: SpawnContext, config: BenchConfig, box: Outbox, rate: int, first: int
) -> list[CommitRecord]:
    count = max(1, int(rate * config.latency_seconds))
    shares = _writers_for(config, rate)

    def args(index: int, child: multiprocessing.connection.Connection) -> tuple[Any, ...]:
        return (
            config.database_url,
            box.schema,
            rate,
            index,
            shares,
            count,
            first,
            config.latency_keys,
            config.body_size,
            child,
        )

    with started_writers(ctx, _writer_process, args, shares, "bench-writer", lead=0.2) as pipes:
        records: list[CommitRecord] = []
        for pipe in pipes:
            records.extend(receive(pipe, config.latency_seconds * 5 + READY_TIMEOUT))
        return records


@contextlib.contextmanager
def started_writers(
    ctx: SpawnContext,
    target: Callable[..., None],
    args: Callable[[int, multiprocessing.connection.Connection], tuple[Any, ...]],
    shares: int,
    name: str,
    *,
    lead: float,
) -> Iterator[list[multiprocessing.connection.Connection]]:
    """`shares` writer processes, `target(*args(index, pipe))` each: started, waited for until
    each says "ready", then sent one start time `lead` seconds ahead (time to connect before
    the first event is due). Yields their pipes; joins them (or kills them) after."""
    pipes: list[multiprocessing.connection.Connection] = []
    processes: list[SpawnProcess] = []
    try:
        for index in range(shares):
            parent, child = ctx.Pipe()
            process = ctx.Process(
                target=target, args=args(index, child), name=f"{name}-{index}", daemon=True
            )
            process.start()
            child.close()
            pipes.append(parent)
            processes.append(process)
        for pipe in pipes:
            expect(pipe, "ready", READY_TIMEOUT)
        start_at = time.monotonic() + lead
        for pipe in pipes:
            pipe.send(start_at)
        yield pipes
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()


def _writer_process(
    database_url: str,
    schema: str,
    rate: int,
    index: int,
    shares: int,
    count: int,
    first: int,
    keys: int,
    body_size: int,
    pipe: multiprocessing.connection.Connection,
) -> None:
    import outbox

    engine = create_engine(database_url, pool_size=1, max_overflow=0)
    box = Outbox(schema=schema)
    records: list[CommitRecord] = []
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        pipe.send("ready")
        start_at = float(pipe.recv())
        for j in range(index, count, shares):
            due = start_at + j / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            i = first + j
            event = Event(type=EVENT_TYPE, key=f"k{i % keys}", payload=payload(i, body_size))
            with engine.begin() as conn:
                outbox.write(conn, event, outbox=box)
            records.append((str(event.id), i, time.monotonic(), due))
        pipe.send(records)
    except BaseException as exc:
        pipe.send(exc)
        raise
    finally:
        engine.dispose()


# -- the consumer process ------------------------------------------------------------------------


@contextlib.contextmanager
def arrivals_consumer(
    ctx: SpawnContext, amqp_url: str, queue: str
) -> Iterator[Callable[[], list[Arrival]]]:
    """A consumer process on `queue`; yields a function that stops it and returns arrivals."""
    parent, child = ctx.Pipe()
    stop = ctx.Event()
    process = ctx.Process(
        target=_consumer_process, args=(amqp_url, queue, child, stop), name="bench-consumer"
    )
    process.daemon = True
    process.start()
    child.close()
    result: list[list[Arrival]] = []

    def collect() -> list[Arrival]:
        if not result:
            stop.set()
            result.append(receive(parent, READY_TIMEOUT))
        return result[0]

    try:
        expect(parent, "ready", READY_TIMEOUT)
        yield collect
    finally:
        stop.set()
        process.join(10)
        if process.is_alive():
            process.kill()


def _consumer_process(
    amqp_url: str, queue: str, pipe: multiprocessing.connection.Connection, stop: EventType
) -> None:
    from tests.support.rabbit import delivery_from_message

    arrivals: list[Arrival] = []
    try:
        connection = open_connection(amqp_url, f"{queue}-consumer")
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1000)
        last_tag = 0

        def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
            nonlocal last_tag
            at = time.monotonic()
            d = delivery_from_message(method, props)
            arrivals.append((d.message_id, d.key, d.seq, d.redelivered, at))
            last_tag = int(method.delivery_tag or 0)

        channel.basic_consume(queue, on_message)
        pipe.send("ready")
        acked = 0
        while not stop.is_set():
            connection.process_data_events(time_limit=0.05)  # type: ignore[arg-type]
            if last_tag > acked:
                channel.basic_ack(last_tag, multiple=True)
                acked = last_tag
        connection.process_data_events(time_limit=0)
        if last_tag > acked:
            channel.basic_ack(last_tag, multiple=True)
        connection.close()
        pipe.send(arrivals)
    except BaseException as exc:
        pipe.send(exc)
        raise


def expect(pipe: multiprocessing.connection.Connection, what: str, timeout: float) -> None:
    message = receive(pipe, timeout)
    if message != what:
        raise RuntimeError(f"child process sent {message!r}, expected {what!r}")


def receive(pipe: multiprocessing.connection.Connection, timeout: float) -> Any:
    if not pipe.poll(timeout):
        raise RuntimeError(f"no answer from a child process within {timeout:.0f} s")
    message = pipe.recv()
    if isinstance(message, BaseException):
        raise RuntimeError(f"a child process failed: {message!r}") from message
    return message
