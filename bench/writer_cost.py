"""Writer cost: what writing its event adds to an application's own transaction.

One transaction inserts one order (a small aggregate table) and commits; the same with its
event written through `outbox.write` in that transaction; and with 10 events. Two more kinds
put those figures in context:

* `round_trip`: the transaction without events plus `SELECT 1`, the least any extra
  statement costs (one round trip to the server): the floor under `one_event`.
* `orm_no_event` / `orm_one_event`: the same order saved through a Session as an ORM
  aggregate (`AggregateRoot` with `outbox.install`), without and with one recorded event:
  the writer's main use.

The kinds take turns in blocks (so that a noisy moment of the shared machine hits all of
them), on one connection, after a warm-up. Times include building the `Event`s: the
application pays that too. Reported: median per transaction, and ratios to the transaction
of the same kind without events.
"""

from __future__ import annotations

import decimal
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, registry, sessionmaker

import outbox
from bench.common import create_engine, median, percentile, progress, rotate, temporary_outbox
from bench.config import BenchConfig
from outbox import AggregateRoot, Event, Outbox

KINDS = ("no_event", "one_event", "many_events", "round_trip", "orm_no_event", "orm_one_event")
RATIOS = {  # reported ratio: (kind, the kind it is compared with)
    "one_event_ratio": ("one_event", "no_event"),
    "many_events_ratio": ("many_events", "no_event"),
    "round_trip_ratio": ("round_trip", "no_event"),
    "orm_one_event_ratio": ("orm_one_event", "orm_no_event"),
}
WARMUP = 50
Work = Callable[[sa.Engine, Session], None]


class BenchOrder(AggregateRoot):
    """The order as an ORM aggregate (mapped imperatively onto each run's table)."""

    __aggregate_type__ = "order"
    id: int | None
    customer: str
    total: decimal.Decimal

    def __init__(self, customer: str, total: decimal.Decimal) -> None:
        self.customer = customer
        self.total = total


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
        **{name: median([r[name] for r in runs]) for name in RATIOS},
        "events_written_ok": all(r["events_written"] == r["events_expected"] for r in runs),
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
    written_before = _count_events(engine, box)
    mapper = registry()
    mapper.map_imperatively(BenchOrder, orders)
    sessions = sessionmaker(engine)
    outbox.install(sessions, outbox=box)
    try:
        work = _kinds(config, box, orders)
        with sessions() as session:
            for kind in KINDS:
                _time_transactions(engine, session, work[kind], WARMUP)
            times: dict[str, list[float]] = {kind: [] for kind in KINDS}
            block = 0
            while len(times["no_event"]) < config.writer_transactions:
                left = config.writer_transactions - len(times["no_event"])
                size = min(config.writer_block, left)
                for kind in rotate(KINDS, block):
                    times[kind].extend(_time_transactions(engine, session, work[kind], size))
                block += 1
    finally:
        mapper.dispose()
    # Every transaction with events really wrote them (the ORM ones through the flush hook).
    per_transaction = 1 + config.writer_many_events + 1  # one_event, many_events, orm_one_event
    expected = (WARMUP + config.writer_transactions) * per_transaction
    result: dict[str, Any] = {
        "events_written": _count_events(engine, box) - written_before,
        "events_expected": expected,
    }
    for kind in KINDS:
        ordered = sorted(times[kind])
        result[f"{kind}_median_us"] = round((median(ordered) or 0.0) * 1e6, 1)
        result[f"{kind}_p95_us"] = round((percentile(ordered, 0.95) or 0.0) * 1e6, 1)
    for name, (kind, base) in RATIOS.items():
        result[name] = round(result[f"{kind}_median_us"] / result[f"{base}_median_us"], 4)
    progress(
        f"writer repeat {repeat + 1}/{config.repeat}: median {result['no_event_median_us']:.0f} us "
        f"without, {result['one_event_median_us']:.0f} us with one event "
        f"(x{result['one_event_ratio']:.2f}; one round trip alone x"
        f"{result['round_trip_ratio']:.2f}), {result['many_events_median_us']:.0f} us with "
        f"{config.writer_many_events} (x{result['many_events_ratio']:.2f}); ORM aggregate "
        f"{result['orm_no_event_median_us']:.0f} us without, "
        f"{result['orm_one_event_median_us']:.0f} us with one (x"
        f"{result['orm_one_event_ratio']:.2f})"
    )
    return result


def _kinds(config: BenchConfig, box: Outbox, orders: sa.Table) -> dict[str, Work]:
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

    def no_event(engine: sa.Engine, session: Session) -> None:
        with engine.begin() as conn:
            place(conn)

    def one_event(engine: sa.Engine, session: Session) -> None:
        with engine.begin() as conn:
            outbox.write(conn, event(place(conn)), outbox=box)

    def many_events(engine: sa.Engine, session: Session) -> None:
        with engine.begin() as conn:
            order_id = place(conn)
            events = [event(order_id) for _ in range(config.writer_many_events)]
            outbox.write(conn, *events, outbox=box)

    def round_trip(engine: sa.Engine, session: Session) -> None:
        with engine.begin() as conn:
            place(conn)
            conn.exec_driver_sql("SELECT 1")

    def orm(record: bool) -> Work:
        def save(engine: sa.Engine, session: Session) -> None:
            with session.begin():
                order = BenchOrder(customer="c-42", total=decimal.Decimal("9.99"))
                if record:
                    order.record("order.placed", {"total": "9.99", "customer": "c-42"})
                session.add(order)
            session.expunge_all()  # like a session per request: nothing kept between them

        return save

    return {
        "no_event": no_event,
        "one_event": one_event,
        "many_events": many_events,
        "round_trip": round_trip,
        "orm_no_event": orm(record=False),
        "orm_one_event": orm(record=True),
    }


def _count_events(engine: sa.Engine, box: Outbox) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(box.events)).scalar_one())


def _time_transactions(engine: sa.Engine, session: Session, work: Work, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        work(engine, session)
        times.append(time.perf_counter() - started)
    return times
