"""What every benchmark needs: throwaway outbox schemas, relay-shaped events, a timed relay
run, and a few statistics."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa

from bench.broker import watch_blocked
from outbox import Event, Outbox
from outbox.schema import PENDING
from relay.app import build_relay
from relay.messages import OutgoingMessage
from relay.metrics import Metrics
from relay.records import ClaimedEvent
from relay.settings import RelaySettings
from tests.support.history import HistoryReport, Written
from tests.support.rabbit import unique_name

EVENT_TYPE = "bench.event"
_PAYLOAD_OVERHEAD = len('{"i":,"pad":""}')


def progress(message: str) -> None:
    """One line on stderr while a benchmark runs (the table goes to stdout at the end)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def create_engine(database_url: str, **kw: Any) -> sa.Engine:
    url = sa.make_url(database_url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return sa.create_engine(url, **kw)


@contextlib.contextmanager
def temporary_outbox(engine: sa.Engine, prefix: str = "bench") -> Iterator[Outbox]:
    """The outbox tables in a fresh schema of their own, dropped afterwards."""
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    box = Outbox(schema=schema)
    try:
        box.create(engine)
        yield box
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def payload(i: int, body_size: int) -> dict[str, Any]:
    """A payload whose compact JSON (the message body) is exactly `body_size` bytes."""
    pad = max(0, body_size - _PAYLOAD_OVERHEAD - len(str(i)))
    return {"i": i, "pad": "x" * pad}


def bench_events(count: int, keys: int, body_size: int, start: int = 0) -> list[Event]:
    """`count` events whose keys take turns (k0, k1, ..., k0, ...): keys interleaved."""
    return [
        Event(type=EVENT_TYPE, key=f"k{i % keys}", payload=payload(i, body_size))
        for i in range(start, start + count)
    ]


def pending_rows(engine: sa.Engine, box: Outbox, after_seq: int = 0) -> list[sa.RowMapping]:
    t = box.events
    with engine.connect() as conn:
        query = sa.select(t).where(t.c.status == PENDING, t.c.seq > after_seq).order_by(t.c.seq)
        return list(conn.execute(query).mappings())


def relay_messages(rows: Sequence[sa.RowMapping], exchange: str) -> list[OutgoingMessage]:
    """The messages the relay publishes for these rows (its own code builds them)."""
    token = uuid.uuid4()
    return [ClaimedEvent.from_row(row, token).message(exchange) for row in rows]


def written_of(rows: Sequence[sa.RowMapping]) -> list[Written]:
    return [Written(id=str(row["id"]), key=row["key"], seq=row["seq"]) for row in rows]


def count_pending(engine: sa.Engine, box: Outbox) -> int:
    t = box.events
    with engine.connect() as conn:
        query = sa.select(sa.func.count()).select_from(t).where(t.c.status == PENDING)
        return int(conn.execute(query).scalar_one())


def relay_settings(
    database_url: str, amqp_url: str, box: Outbox, exchange: str, **changes: Any
) -> RelaySettings:
    """The relay's defaults, on this run's schema and exchange."""
    return RelaySettings(
        database_url=database_url,
        amqp_url=amqp_url,
        schema=box.schema,
        exchange=exchange,
        name=unique_name("bench-relay"),
        **changes,
    )


class ConfirmClock(Metrics):
    """Relay metrics hook: when was the last event confirmed (relay loop thread only)."""

    def __init__(self) -> None:
        self.confirmed = 0
        self.last_confirm: float | None = None

    def published(
        self, event_type: str, commit_to_confirm: float, publish_to_confirm: float
    ) -> None:
        self.confirmed += 1
        self.last_confirm = time.perf_counter()


@dataclasses.dataclass(frozen=True)
class RelayRun:
    """One `Relay.run()` with `until_empty=True`, timed from the call."""

    events: int  # confirmed by the broker
    wall_seconds: float  # run() from call to return: start-up, work, graceful shutdown
    confirm_seconds: float  # from the call to the last confirm: "until all are confirmed"
    queries: int  # relay.store.queries_total
    broker_blocked: bool
    cpu_seconds: float  # CPU this process used during run(): the relay's threads

    @property
    def cpu_us_per_event(self) -> float:
        """The relay's own CPU per confirmed event: steadier than rates on a shared machine
        (PostgreSQL's and RabbitMQ's share is not in it)."""
        return self.cpu_seconds / self.events * 1e6 if self.events else 0.0

    @property
    def rate(self) -> float:
        """Events per second until all are confirmed."""
        return self.events / self.confirm_seconds if self.confirm_seconds > 0 else 0.0

    @property
    def wall_rate(self) -> float:
        return self.events / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "wall_seconds": round(self.wall_seconds, 4),
            "confirm_seconds": round(self.confirm_seconds, 4),
            "shutdown_seconds": round(self.wall_seconds - self.confirm_seconds, 4),
            "rate": round(self.rate, 1),
            "wall_rate": round(self.wall_rate, 1),
            "queries": self.queries,
            "broker_blocked": self.broker_blocked,
            "cpu_seconds": round(self.cpu_seconds, 3),
            "cpu_us_per_event": round(self.cpu_us_per_event, 1),
        }


def run_relay_until_empty(settings: RelaySettings) -> RelayRun:
    """Build the relay as the CLI does (`relay.app.build_relay`) and run it in this thread
    until nothing is left to publish."""
    clock = ConfirmClock()
    relay = build_relay(settings.replace(until_empty=True), metrics=clock)
    try:
        with watch_blocked() as blocked:
            cpu_before = time.process_time()
            started = time.perf_counter()
            relay.run()
            ended = time.perf_counter()
            cpu = time.process_time() - cpu_before
    finally:
        relay.store.engine.dispose()
    last = clock.last_confirm if clock.last_confirm is not None else ended
    return RelayRun(
        events=clock.confirmed,
        wall_seconds=ended - started,
        confirm_seconds=last - started,
        queries=relay.store.queries_total,
        broker_blocked=bool(blocked),
        cpu_seconds=cpu,
    )


def history_counts(report: HistoryReport) -> dict[str, int]:
    return {
        "committed": report.committed,
        "delivered": report.delivered,
        "lost": len(report.lost),
        "unexpected": len(report.unexpected),
        "duplicates": report.duplicates,
        "reordered": len(report.reordered),
        "inconsistent": len(report.inconsistent),
    }


def add_counts(total: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    return {key: total.get(key, 0) + more.get(key, 0) for key in total.keys() | more.keys()}


def counts_ok(counts: dict[str, int]) -> bool:
    return all(
        counts.get(k, 0) == 0
        for k in ("lost", "unexpected", "duplicates", "reordered", "inconsistent")
    )


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def rotate(items: Sequence[str], by: int) -> list[str]:
    """`items` starting at position `by`: alternates which run goes first in each repeat."""
    by %= len(items)
    return [*items[by:], *items[:by]]
