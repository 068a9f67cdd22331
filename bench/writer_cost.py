"""Writer cost: what writing its event adds to an application's own transaction.

One transaction inserts one order (a small aggregate table) and commits; the same with its
event written through `outbox.write` in that transaction; and with 10 events. The three kinds
take turns in blocks (so that a noisy moment of the shared machine hits all of them), on one
connection, after a warm-up. Times include building the `Event`s: the application pays that
too. Reported: median per transaction, and the ratio to the transaction without events.
"""

from __future__ import annotations

import decimal
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

import outbox
from bench.common import create_engine, median, percentile, progress, rotate, temporary_outbox
from bench.config import BenchConfig
from outbox import Event, Outbox

KINDS = ("no_event", "one_event", "many_events")
WARMUP = 50


def run(config: BenchConfig) -> dict[str, Any]:
    engine = create_engine(config.database_url, pool_size=1, max_overflow=0)
    runs: list[dict[str, Any]] = []
    try:
        with temporary_outbox(engine, "bench_writer") as box:
            orders = _orders_table(box)
            orders.create(engine)
            for repeat in range(config.repeat):
                runs.append(_one_run(config, engine, box, orders, repeat))
    finally:
        engine.dispose()
    return {
        "transactions": config.writer_transactions,
        "many_events": config.writer_many_events,
        **{f"{kind}_median_us": median([r[f"{kind}_median_us"] for r in runs]) for kind in KINDS},
        "one_event_ratio": median([r["one_event_ratio"] for r in runs]),
        "many_events_ratio": median([r["many_events_ratio"] for r in runs]),
        "runs": runs,
    }


def _orders_table(box: Outbox) -> sa.Table:
    return sa.Table(
        "bench_orders",
        sa.MetaData(),
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("customer", sa.Text(), nullable=False),
        sa.Column("total", sa.Numeric(12, 2), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
        schema=box.schema,
    )


def _one_run(
    config: BenchConfig, engine: sa.Engine, box: Outbox, orders: sa.Table, repeat: int
) -> dict[str, Any]:
    def place(conn: Connection) -> int:
        insert = orders.insert().values(customer="c-42", total=decimal.Decimal("9.99"))
        return int(conn.execute(insert.returning(orders.c.id)).scalar_one())

    def event(order_id: int) -> Event:
        return Event(
            type="order.placed",
            aggregate_type="order",
            aggregate_id=str(order_id),
            payload={"order_id": order_id, "total": "9.99", "customer": "c-42"},
        )

    def no_event(conn: Connection) -> None:
        place(conn)

    def one_event(conn: Connection) -> None:
        outbox.write(conn, event(place(conn)), outbox=box)

    def many_events(conn: Connection) -> None:
        order_id = place(conn)
        events = [event(order_id) for _ in range(config.writer_many_events)]
        outbox.write(conn, *events, outbox=box)

    work: dict[str, Callable[[Connection], None]] = {
        "no_event": no_event,
        "one_event": one_event,
        "many_events": many_events,
    }
    for kind in KINDS:
        _time_transactions(engine, work[kind], WARMUP)
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    block = 0
    while len(times["no_event"]) < config.writer_transactions:
        size = min(config.writer_block, config.writer_transactions - len(times["no_event"]))
        for kind in rotate(KINDS, block):
            times[kind].extend(_time_transactions(engine, work[kind], size))
        block += 1
    result: dict[str, Any] = {}
    for kind in KINDS:
        ordered = sorted(times[kind])
        result[f"{kind}_median_us"] = round((median(ordered) or 0.0) * 1e6, 1)
        result[f"{kind}_p95_us"] = round((percentile(ordered, 0.95) or 0.0) * 1e6, 1)
    result["one_event_ratio"] = round(
        result["one_event_median_us"] / result["no_event_median_us"], 4
    )
    result["many_events_ratio"] = round(
        result["many_events_median_us"] / result["no_event_median_us"], 4
    )
    progress(
        f"writer repeat {repeat + 1}/{config.repeat}: median {result['no_event_median_us']:.0f} us "
        f"without, {result['one_event_median_us']:.0f} us with one event "
        f"(x{result['one_event_ratio']:.2f}), {result['many_events_median_us']:.0f} us with "
        f"{config.writer_many_events} (x{result['many_events_ratio']:.2f})"
    )
    return result


def _time_transactions(
    engine: sa.Engine, work: Callable[[Connection], None], count: int
) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        with engine.begin() as conn:
            work(conn)
        times.append(time.perf_counter() - started)
    return times
