"""Backlog: does a big table slow the relay down?

The same number of pending events (K=100 keys) is relayed from a small table (nothing but
those events) and from a big one (the same plus published rows kept for retention, e.g.
990,000 + 10,000 = 1,000,000). Runs alternate, small and big, in each repeat; ratio =
big rate / small rate, the median of the per-repeat ratios.

The published rows go in with one `INSERT ... SELECT generate_series` (the outbox's own
triggers still number them), older than the pending ones, which are written through
`outbox.write` as an application would. Both tables are ANALYZEd before each run, as
autovacuum would have done for a table in its steady state.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from bench.broker import BenchQueue
from bench.common import (
    EVENT_TYPE,
    RelayRun,
    add_counts,
    bench_events,
    counts_ok,
    create_engine,
    history_counts,
    median,
    pending_rows,
    progress,
    relay_settings,
    rotate,
    run_relay_until_empty,
    temporary_outbox,
    written_of,
)
from bench.config import BenchConfig
from outbox import Outbox
from outbox.schema import PENDING, PUBLISHED
from tests.support.history import check_history
from tests.support.relays import write_events

_PAD = len('{"i":,"pad":""}')
# A run disturbed by a broker resource alarm (another user of the shared broker) is redone.
MAX_TRIES = 3


def run(config: BenchConfig) -> dict[str, Any]:
    engine = create_engine(config.database_url, pool_size=2)
    small_runs: list[dict[str, Any]] = []
    big_runs: list[dict[str, Any]] = []
    ratios: list[float] = []
    counts: dict[str, int] = {}
    try:
        with temporary_outbox(engine, "bench_big") as big:
            published = config.backlog_big_rows - config.backlog_pending
            started = time.monotonic()
            _insert_published(engine, big, published, config)
            setup_seconds = time.monotonic() - started
            progress(f"backlog: {published:,} published rows inserted in {setup_seconds:.1f} s")
            first = 0
            for repeat in range(config.repeat):
                results: dict[str, RelayRun] = {}
                for which in rotate(("small", "big"), repeat):
                    if which == "small":
                        with temporary_outbox(engine, "bench_small") as small:
                            _insert_published(
                                engine,
                                small,
                                config.backlog_small_rows - config.backlog_pending,
                                config,
                            )
                            relay_run, report = _trial(config, engine, small, first)
                    else:
                        relay_run, report = _trial(config, engine, big, first)
                    first += config.backlog_pending
                    results[which] = relay_run
                    counts = add_counts(counts, report)
                small_runs.append(results["small"].as_dict())
                big_runs.append(results["big"].as_dict())
                ratios.append(results["big"].rate / results["small"].rate)
                progress(
                    f"backlog repeat {repeat + 1}/{config.repeat}: "
                    f"small {results['small'].rate:,.0f}/s, big {results['big'].rate:,.0f}/s, "
                    f"ratio {ratios[-1]:.2f}"
                )
            big_rows = _row_count(engine, big)
    finally:
        engine.dispose()
    return {
        "keys": config.backlog_keys,
        "pending": config.backlog_pending,
        "small_rows": config.backlog_small_rows,
        "big_rows": config.backlog_big_rows,
        "big_rows_at_end": big_rows,
        "setup_seconds": round(setup_seconds, 1),
        "small_rate": median([r["rate"] for r in small_runs]),
        "big_rate": median([r["rate"] for r in big_runs]),
        "ratio": median(ratios),
        "correctness": {**counts, "ok": counts_ok(counts)},
        "runs": {"small": small_runs, "big": big_runs},
    }


def _insert_published(engine: sa.Engine, box: Outbox, count: int, config: BenchConfig) -> None:
    """`count` published rows in one statement, then ANALYZE and CHECKPOINT (so that neither
    stale statistics nor a checkpoint of the bulk load lands inside a measured run)."""
    if count <= 0:
        return
    table = box.qualified_name
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"""
                INSERT INTO {table}
                    (id, type, key, routing_key, payload, occurred_at, status, published_at)
                SELECT gen_random_uuid(), :type, 'k' || (g % :keys), :type,
                       '{{"i":' || g || ',"pad":"'
                           || repeat('x', greatest(0, :body - :pad - length(g::text)))
                           || '"}}',
                       now() - interval '1 hour', :published, now()
                FROM generate_series(1, :count) AS g
                """
            ),
            {
                "type": EVENT_TYPE,
                "keys": config.backlog_keys,
                "body": config.body_size,
                "pad": _PAD,
                "published": PUBLISHED,
                "count": count,
            },
        )
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.exec_driver_sql("CHECKPOINT")


def _trial(
    config: BenchConfig, engine: sa.Engine, box: Outbox, first: int
) -> tuple[RelayRun, dict[str, int]]:
    events = bench_events(config.backlog_pending, config.backlog_keys, config.body_size, first)
    before = _max_seq(engine, box)
    write_events(engine, box, events)
    rows = pending_rows(engine, box, after_seq=before)
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.exec_driver_sql(f"ANALYZE {box.qualified_name}")
    for attempt in range(1, MAX_TRIES + 1):
        with BenchQueue(config.amqp_url, "bench-backlog") as queue:
            settings = relay_settings(config.database_url, config.amqp_url, box, queue.exchange)
            relay_run = run_relay_until_empty(settings)
            deliveries, _ = queue.drain(expected=len(rows), idle_timeout=5.0)
        report = history_counts(check_history(written_of(rows), deliveries))
        if not relay_run.broker_blocked or attempt == MAX_TRIES:
            return relay_run, report
        progress("backlog run disturbed by a broker resource alarm; running it again")
        _republish(engine, box, after_seq=before)
    raise AssertionError("unreachable")


def _republish(engine: sa.Engine, box: Outbox, after_seq: int) -> None:
    """Make this trial's rows pending again (for a run that has to be redone)."""
    t = box.events
    with engine.begin() as conn:
        conn.execute(
            sa.update(t)
            .where(t.c.seq > after_seq)
            .values(
                status=PENDING,
                published_at=None,
                claim_token=None,
                claimed_by=None,
                lease_until=None,
            )
        )
    box.create(engine)  # gives the keys of the pending rows their rows again


def _max_seq(engine: sa.Engine, box: Outbox) -> int:
    with engine.connect() as conn:
        value = conn.execute(sa.select(sa.func.max(box.events.c.seq))).scalar_one()
    return int(value or 0)


def _row_count(engine: sa.Engine, box: Outbox) -> int:
    with engine.connect() as conn:
        query = sa.select(sa.func.count()).select_from(box.events)
        return int(conn.execute(query).scalar_one())
