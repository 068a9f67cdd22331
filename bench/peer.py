"""Peer: our relay against txoutbox 0.2.2 (a public outbox relay), side by side in one run.

Both relays run as processes of their own, each in its fairest configuration (ours: its
defaults, as `outbox-relay run` builds it; txoutbox: see `bench.peer_txoutbox`), with its
LISTEN/NOTIFY wake-up on, publishing with confirms into a fresh durable queue.

* latency, per rate (200/s and 600/s by default): 4 writer processes commit one event per
  transaction over 100 keys on an open-loop schedule, through each library's own producer
  call; a consumer process records arrivals; commit to arrival is the latency (one
  system-wide CLOCK_MONOTONIC). Each relay process's CPU (user + system, all its threads,
  from /proc) and the writers' own CPU are taken over the run, from the first write until
  the table has nothing pending.
* throughput: a backlog of 20,000 committed events over 100 keys, drained by each relay,
  from its start to the last confirm.

Runs alternate (ours first, then txoutbox first, ...) so that the shared machine's noise
falls on both; figures are medians of `--repeat` runs, ratios are ours / txoutbox of the
medians. Every run checks what the consumer received: nothing lost, nothing duplicated,
every key in order (txoutbox claims per-key order too, with `strict_ordering`, its default).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import multiprocessing
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from typing import Any

import sqlalchemy as sa

from bench import peer_processes
from bench.broker import BenchQueue
from bench.common import (
    add_counts,
    bench_events,
    count_pending,
    counts_ok,
    create_engine,
    history_counts,
    median,
    progress,
    relay_settings,
    rotate,
    temporary_outbox,
)
from bench.config import BenchConfig
from bench.latency import (
    arrivals_consumer,
    commit_to_delivery,
    expect,
    receive,
    started_writers,
)
from bench.peer_processes import KINDS, OURS, READY_TIMEOUT, TXOUTBOX, process_cpu_seconds
from outbox import Outbox
from tests.support.history import Delivery, Written, check_history
from tests.support.relays import write_events, written

TXOUTBOX_VERSION = "0.2.2"
EXTRA_MODULES = ("txoutbox", "asyncpg", "aio_pika")
# The relay's LISTEN connection comes up just after its broker connection: let it settle.
LISTEN_SETTLE = 0.3
ARRIVAL_SETTLE = 0.3
DRAIN_TIMEOUT = 60.0


def missing_extra() -> str | None:
    """Why the benchmark cannot run here, or None."""
    missing = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (
        f"{', '.join(missing)} not installed: the peer benchmark needs the bench extra "
        "(pip install -e '.[bench]'; make bench installs it)"
    )


@dataclasses.dataclass(frozen=True)
class Table:
    """One run's outbox: ours (an `Outbox` schema) or txoutbox's table in a schema."""

    kind: str
    schema: str
    channel: str  # txoutbox's NOTIFY channel (ours derives its own from the schema)
    box: Outbox | None = None

    def pending(self, engine: sa.Engine) -> int:
        if self.box is not None:
            return count_pending(engine, self.box)
        from bench import peer_txoutbox

        return peer_txoutbox.count_pending(engine, self.schema)

    def written(self, engine: sa.Engine) -> list[Written]:
        if self.box is not None:
            return written(engine, self.box)
        from bench import peer_txoutbox

        return peer_txoutbox.written(engine, self.schema)


def run(config: BenchConfig) -> dict[str, Any]:
    reason = missing_extra()
    if reason is not None:
        raise RuntimeError(reason)
    ctx = multiprocessing.get_context("spawn")
    latency: dict[str, dict[int, list[dict[str, Any]]]] = {
        kind: {rate: [] for rate in config.peer_rates} for kind in KINDS
    }
    throughput: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for repeat in range(config.repeat):
        for rate in config.peer_rates:
            for kind in rotate(KINDS, repeat):
                result = _latency_run(ctx, config, kind, rate)
                latency[kind][rate].append(result)
                progress(
                    f"peer {kind} at {rate}/s, repeat {repeat + 1}/{config.repeat}: "
                    f"p50 {result['p50_ms']} p99 {result['p99_ms']} ms, relay CPU "
                    f"{result['relay_cpu_seconds']:.2f} s, writers' CPU "
                    f"{result['writer_cpu_seconds']:.2f} s"
                )
    for repeat in range(config.repeat):
        for kind in rotate(KINDS, repeat):
            result = _throughput_run(ctx, config, kind)
            throughput[kind].append(result)
            progress(
                f"peer {kind} drains {config.peer_backlog:,} events, repeat "
                f"{repeat + 1}/{config.repeat}: {result['rate']:,.0f}/s"
            )
    return _summary(config, latency, throughput)


# -- summary -------------------------------------------------------------------------------------

LATENCY_FIGURES = (
    "achieved_rate",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "relay_cpu_seconds",
    "relay_cpu_percent",
    "relay_cpu_us_per_event",
    "writer_cpu_seconds",
    "writer_cpu_percent",
)


def _summary(
    config: BenchConfig,
    latency: dict[str, dict[int, list[dict[str, Any]]]],
    throughput: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    rates = []
    for rate in config.peer_rates:
        row: dict[str, Any] = {"rate": rate, "writers": config.peer_writers}
        for kind in KINDS:
            runs = latency[kind][rate]
            row[kind] = {
                name: median([r[name] for r in runs if r[name] is not None])
                for name in LATENCY_FIGURES
            }
            row[kind]["samples"] = sum(r["samples"] for r in runs)
            # The slowest run's writers: a latency median may come from that run
            # (`peer_report` judges a comparison only if every run carried the load).
            reached = [r["achieved_rate"] for r in runs]
            row[kind]["least_achieved_rate"] = (
                min(reached) if reached and None not in reached else None
            )
        for name in ("p50_ms", "p95_ms", "p99_ms", "relay_cpu_seconds"):
            row[f"{name}_ratio"] = _ratio(row[OURS][name], row[TXOUTBOX][name])
        rates.append(row)
    drained = {
        kind: {
            "rate": median([r["rate"] for r in throughput[kind]]),
            "cpu_us_per_event": median([r["cpu_us_per_event"] for r in throughput[kind]]),
        }
        for kind in KINDS
    }
    correctness = {}
    for kind in KINDS:
        counts: dict[str, int] = {}
        sizes_ok = True
        for run in [*(r for rs in latency[kind].values() for r in rs), *throughput[kind]]:
            counts = add_counts(counts, run["correctness"])
            sizes_ok = sizes_ok and run.get("body_sizes_ok", True)
        correctness[kind] = {**counts, "body_sizes_ok": sizes_ok, "ok": counts_ok(counts)}
    return {
        "txoutbox_version": TXOUTBOX_VERSION,
        "keys": config.peer_keys,
        "writers": config.peer_writers,
        "seconds_per_run": config.peer_seconds,
        "rates": rates,
        "throughput": {
            "backlog": config.peer_backlog,
            "keys": config.peer_keys,
            **drained,
            "ratio": _ratio(drained[OURS]["rate"], drained[TXOUTBOX]["rate"]),
        },
        "correctness": correctness,
        "runs": {"latency": latency, "throughput": throughput},
    }


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or not theirs:
        return None
    return round(ours / theirs, 3)


# -- one latency run -------------------------------------------------------------------------------


def _latency_run(ctx: SpawnContext, config: BenchConfig, kind: str, rate: int) -> dict[str, Any]:
    engine = create_engine(config.database_url, pool_size=2)
    try:
        with (
            _table(engine, config, kind) as table,
            BenchQueue(config.amqp_url, f"bench-peer-{kind}") as queue,
            arrivals_consumer(ctx, config.amqp_url, queue.queue) as collect,
        ):
            with _relay_daemon(ctx, config, table, queue.exchange) as pid:
                time.sleep(LISTEN_SETTLE)
                cpu_before = process_cpu_seconds(pid)
                started = time.monotonic()
                records, writer_cpu = _write_at_rate(ctx, config, table, rate)
                _wait_drained(engine, table)
                relay_cpu = process_cpu_seconds(pid) - cpu_before
                span = time.monotonic() - started
            time.sleep(ARRIVAL_SETTLE)
            arrivals = collect()
            truth = table.written(engine)
    finally:
        engine.dispose()
    arrived: dict[str, float] = {}
    deliveries: list[Delivery] = []
    for message_id, key, seq, redelivered, at in arrivals:
        deliveries.append(Delivery(message_id, key, seq, redelivered))
        arrived.setdefault(message_id, at)
    return {
        **commit_to_delivery(records, arrived, warmup=config.peer_warmup),
        "rate": rate,
        "relay_cpu_seconds": round(relay_cpu, 3),
        "relay_cpu_percent": round(relay_cpu / span * 100, 1),
        "relay_cpu_us_per_event": round(relay_cpu / max(1, len(records)) * 1e6, 1),
        "writer_cpu_seconds": round(writer_cpu, 3),
        "writer_cpu_percent": round(writer_cpu / span * 100, 1),
        "span_seconds": round(span, 3),
        "correctness": history_counts(check_history(truth, deliveries)),
    }


def _write_at_rate(
    ctx: SpawnContext, config: BenchConfig, table: Table, rate: int
) -> tuple[list[tuple[str, int, float, float]], float]:
    """All writers' commit records and their CPU seconds in all."""
    count = max(1, int(rate * config.peer_seconds))
    shares = config.peer_writers

    def args(index: int, child: Connection) -> tuple[Any, ...]:
        return (
            table.kind,
            config.database_url,
            table.schema,
            table.channel,
            rate,
            index,
            shares,
            count,
            config.peer_keys,
            config.body_size,
            child,
        )

    writer = peer_processes.writer
    with started_writers(ctx, writer, args, shares, "bench-peer-writer", lead=0.5) as pipes:
        records: list[tuple[str, int, float, float]] = []
        cpu = 0.0
        for pipe in pipes:
            result = receive(pipe, config.peer_seconds * 5 + READY_TIMEOUT)
            records.extend(result["records"])
            cpu += result["cpu_seconds"]
        return records, cpu


def _wait_drained(engine: sa.Engine, table: Table) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while table.pending(engine):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{table.kind}: events still pending {DRAIN_TIMEOUT:.0f} s on")
        time.sleep(0.05)


# -- one throughput run ----------------------------------------------------------------------------


def _throughput_run(ctx: SpawnContext, config: BenchConfig, kind: str) -> dict[str, Any]:
    engine = create_engine(config.database_url, pool_size=2)
    try:
        with _table(engine, config, kind) as table:
            n, keys = config.peer_backlog, config.peer_keys
            if table.box is not None:
                write_events(engine, table.box, bench_events(n, keys, config.body_size))
            else:
                from bench import peer_txoutbox

                peer_txoutbox.prefill(engine, table.schema, n, keys, config.body_size)
            truth = table.written(engine)
            with BenchQueue(config.amqp_url, f"bench-peer-{kind}") as queue:
                result: dict[str, Any] = _drain(ctx, config, table, queue.exchange)
                deliveries, sizes = queue.drain(expected=len(truth), idle_timeout=5.0)
    finally:
        engine.dispose()
    result["correctness"] = history_counts(check_history(truth, deliveries))
    result["body_sizes_ok"] = all(size == config.body_size for size in sizes)
    return result


def _drain(ctx: SpawnContext, config: BenchConfig, table: Table, exchange: str) -> Any:
    parent, child = ctx.Pipe()
    target: Callable[..., None]
    args: tuple[Any, ...]
    if table.box is not None:
        settings = relay_settings(config.database_url, config.amqp_url, table.box, exchange)
        target, args = peer_processes.our_drain, (settings, child)
    else:
        target = peer_processes.txoutbox_drain
        args = (
            config.database_url,
            config.amqp_url,
            table.schema,
            table.channel,
            exchange,
            config.peer_backlog,
            child,
        )
    process = ctx.Process(target=target, args=args, name=f"bench-peer-{table.kind}", daemon=True)
    process.start()
    child.close()
    try:
        return receive(parent, READY_TIMEOUT + DRAIN_TIMEOUT)
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()


# -- tables and relay processes ----------------------------------------------------------------


@contextlib.contextmanager
def _table(engine: sa.Engine, config: BenchConfig, kind: str) -> Iterator[Table]:
    if kind == OURS:
        with temporary_outbox(engine, "bench_peer") as box:
            assert box.schema is not None
            yield Table(kind, box.schema, "", box)
        return
    from bench import peer_txoutbox

    suffix = uuid.uuid4().hex[:10]
    table = Table(kind, f"bench_peer_tx_{suffix}", f"bench_peer_{suffix}")
    try:
        asyncio.run(peer_txoutbox.create_table(config.database_url, table.schema, table.channel))
        yield table
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{table.schema}" CASCADE')


@contextlib.contextmanager
def _relay_daemon(
    ctx: SpawnContext, config: BenchConfig, table: Table, exchange: str
) -> Iterator[int]:
    """The relay of `table.kind` in a process of its own; yields its pid; stops it on exit."""
    parent, child = ctx.Pipe()
    stop = ctx.Event()
    target: Callable[..., None]
    args: tuple[Any, ...]
    if table.box is not None:
        settings = relay_settings(config.database_url, config.amqp_url, table.box, exchange)
        target, args = peer_processes.our_relay, (settings, child, stop)
    else:
        target = peer_processes.txoutbox_relay
        args = (
            config.database_url,
            config.amqp_url,
            table.schema,
            table.channel,
            exchange,
            child,
            stop,
        )
    process = ctx.Process(target=target, args=args, name=f"bench-peer-{table.kind}", daemon=True)
    process.start()
    child.close()
    try:
        expect(parent, "ready", READY_TIMEOUT)
        assert process.pid is not None
        yield process.pid
        stop.set()
        expect(parent, "stopped", READY_TIMEOUT)
    finally:
        stop.set()
        process.join(30)
        if process.is_alive():
            process.kill()
