"""Throughput: N committed events over K interleaved keys, relay vs raw pika.

Per K and repeat, the same outbox rows feed three runs, in an order that rotates from repeat
to repeat (the machine is shared, so alternating spreads its noise over all three):

* relay: `build_relay(until_empty=True).run()`, timed from the call to the last confirm (and
  to its return); afterwards the relay's queue is drained and checked (nothing lost, no
  duplicate, every key in order).
* baseline: the same messages (the relay's own `ClaimedEvent.message()` of the same rows,
  with the publisher's properties) published by raw pika with a window of 1000 unconfirmed,
  into the same kind of queue, from connecting to the last confirm.
* baseline window=K: the same with at most K unconfirmed, which is all strict per-key order
  allows (one in flight per key): the ceiling of any relay that keeps per-key order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from bench.baseline import BaselineRun, publish_messages
from bench.broker import BenchQueue
from bench.common import (
    RelayRun,
    add_counts,
    bench_events,
    counts_ok,
    history_counts,
    median,
    pending_rows,
    progress,
    relay_messages,
    relay_settings,
    rotate,
    run_relay_until_empty,
    temporary_outbox,
    written_of,
)
from bench.config import BenchConfig
from outbox import Outbox
from outbox.schema import PENDING
from relay.messages import OutgoingMessage
from tests.support.history import Written, check_history
from tests.support.relays import write_events

RUNS = ("relay", "baseline", "baseline_k")
# A run disturbed by a broker resource alarm (another user of the shared broker) is redone.
MAX_TRIES = 3


def run(config: BenchConfig) -> dict[str, Any]:
    engine = sa.create_engine(config.database_url, pool_size=2)
    try:
        per_k = [_for_keys(config, engine, keys) for keys in config.keys]
    finally:
        engine.dispose()
    return {
        "n": config.n,
        "body_size": config.body_size,
        "window": config.window,
        "window_k_messages_per_slot": config.window_k_messages_per_slot,
        "per_keys": per_k,
    }


def _for_keys(config: BenchConfig, engine: sa.Engine, keys: int) -> dict[str, Any]:
    relay_runs: list[dict[str, Any]] = []
    base_runs: list[dict[str, Any]] = []
    base_k_runs: list[dict[str, Any]] = []
    ratios: list[float] = []
    wall_ratios: list[float] = []
    ratios_k: list[float] = []
    cpu_ratios: list[float] = []
    counts: dict[str, int] = {}
    body_sizes_ok = True
    same_window = keys >= config.window
    for repeat in range(config.repeat):
        with temporary_outbox(engine, "bench_tp") as box:
            write_events(engine, box, bench_events(config.n, keys, config.body_size))
            rows = pending_rows(engine, box)
            truth = written_of(rows)
            messages = relay_messages(rows, exchange="")
            results: dict[str, Any] = {}
            for which in rotate(RUNS, repeat):
                if which == "relay":
                    relay_run, report, sizes_ok = _relay_trial(config, box, truth)
                    results["relay"] = relay_run
                    counts = add_counts(counts, report)
                    body_sizes_ok = body_sizes_ok and sizes_ok
                elif which == "baseline":
                    results["baseline"] = _baseline_trial(config, messages, config.window)
                elif not same_window:
                    limit = min(len(messages), config.window_k_messages_per_slot * keys)
                    results["baseline_k"] = _baseline_trial(config, messages[:limit], keys)
        relay_run = results["relay"]
        base: BaselineRun = results["baseline"]
        base_k: BaselineRun = results.get("baseline_k", base)
        relay_runs.append(relay_run.as_dict())
        base_runs.append(_baseline_dict(base))
        base_k_runs.append(_baseline_dict(base_k))
        ratios.append(relay_run.rate / base.rate)
        wall_ratios.append(relay_run.wall_rate / base.rate)
        ratios_k.append(relay_run.rate / base_k.rate)
        if base_k.cpu_us_per_message > 0:
            cpu_ratios.append(relay_run.cpu_us_per_event / base_k.cpu_us_per_message)
        progress(
            f"throughput K={keys} repeat {repeat + 1}/{config.repeat}: "
            f"relay {relay_run.rate:,.0f}/s (run() {relay_run.wall_rate:,.0f}/s), "
            f"raw pika {base.rate:,.0f}/s, "
            f"raw pika window={min(keys, config.window)} {base_k.rate:,.0f}/s, "
            f"ratio {ratios[-1]:.2f}"
        )
    return {
        "keys": keys,
        "relay_rate": median([r["rate"] for r in relay_runs]),
        "relay_wall_rate": median([r["wall_rate"] for r in relay_runs]),
        "relay_shutdown_seconds": median([r["shutdown_seconds"] for r in relay_runs]),
        "relay_cpu_us_per_event": median([r["cpu_us_per_event"] for r in relay_runs]),
        "baseline_k_cpu_us_per_message": median([r["cpu_us_per_message"] for r in base_k_runs]),
        "cpu_ratio_vs_window_k": median(cpu_ratios),
        "baseline_rate": median([r["rate"] for r in base_runs]),
        "baseline_k_window": min(keys, config.window),
        "baseline_k_rate": median([r["rate"] for r in base_k_runs]),
        "ratio": median(ratios),
        "ratio_wall": median(wall_ratios),
        "ratio_vs_window_k": median(ratios_k),
        "correctness": {**counts, "body_sizes_ok": body_sizes_ok, "ok": counts_ok(counts)},
        "runs": {"relay": relay_runs, "baseline": base_runs, "baseline_k": base_k_runs},
    }


def _relay_trial(
    config: BenchConfig, box: Outbox, truth: Sequence[Written]
) -> tuple[RelayRun, dict[str, int], bool]:
    for attempt in range(1, MAX_TRIES + 1):
        with BenchQueue(config.amqp_url, "bench-relay") as queue:
            settings = relay_settings(config.database_url, config.amqp_url, box, queue.exchange)
            relay_run = run_relay_until_empty(settings)
            deliveries, sizes = queue.drain(expected=len(truth), idle_timeout=5.0)
        report = history_counts(check_history(truth, deliveries))
        sizes_ok = all(size == config.body_size for size in sizes)
        if not relay_run.broker_blocked or attempt == MAX_TRIES:
            return relay_run, report, sizes_ok
        # Blocked by someone else's alarm: every row is published; write them again.
        progress("relay run disturbed by a broker resource alarm; running it again")
        _republish_all(config, box)
    raise AssertionError("unreachable")


def _republish_all(config: BenchConfig, box: Outbox) -> None:
    engine = sa.create_engine(config.database_url)
    t = box.events
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.update(t).values(
                    status=PENDING,
                    published_at=None,
                    claim_token=None,
                    claimed_by=None,
                    lease_until=None,
                )
            )
        box.create(engine)  # gives the keys of the pending rows their rows again
    finally:
        engine.dispose()


def _baseline_trial(
    config: BenchConfig, messages: Sequence[OutgoingMessage], window: int
) -> BaselineRun:
    for attempt in range(1, MAX_TRIES + 1):
        with BenchQueue(config.amqp_url, "bench-base") as queue:
            result = publish_messages(
                messages, window=window, exchange=queue.exchange, amqp_url=config.amqp_url
            )
            arrived = queue.message_count()
        if arrived != len(messages):
            raise RuntimeError(
                f"baseline: {arrived} of {len(messages)} confirmed messages are in the queue"
            )
        if not result.broker_blocked or attempt == MAX_TRIES:
            return result
        progress("baseline run disturbed by a broker resource alarm; running it again")
    raise AssertionError("unreachable")


def _baseline_dict(run: BaselineRun) -> dict[str, Any]:
    return {
        "messages": run.messages,
        "window": run.window,
        "total_seconds": round(run.total_seconds, 4),
        "publish_seconds": round(run.publish_seconds, 4),
        "rate": round(run.rate, 1),
        "publish_rate": round(run.publish_rate, 1),
        "cpu_us_per_message": round(run.cpu_us_per_message, 1),
        "broker_blocked": run.broker_blocked,
    }
