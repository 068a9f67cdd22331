"""Consumer throughput: the inbox consumer against raw pika consumers, measured in the same run.

    .venv/bin/python -m bench.consumer [--n 5000] [--keys 100] [--queues 4] [--repeat 3]

Each repeat fills a fresh consumer group's queues (the real topology: consistent-hash exchange,
quorum queues with single active consumer) with N relay-shaped messages over K keys, then
times draining them with:
- `inbox`: `relay.consumer.Consumer`s (`--threads`, 1 by default, sharing the queues) with
  one handler that inserts one row: per message one transaction with the inbox row, the key
  row and the handler's insert, then the ack;
- `raw+tx`: raw pika, prefetch 1 per queue, the same insert in its own transaction, then the
  ack (what a hand-written consumer without dedup or order checks does);
- `raw`: raw pika, prefetch 1 per queue, ack only (the broker's ceiling for this topology).
The inbox run is checked: every message applied once, in order per key.

With `--latency`, it then writes one event per transaction at `--rate` events/s for
`--seconds`, with the relay and the consumer running (threads of this process), and reports
the time from each writer's commit to the commit of its handler's transaction: p50, p95, p99.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import outbox
from bench.common import create_engine, progress
from bench.config import DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL
from outbox import Event, Outbox
from outbox.consumer import Handlers, Inbox, Message, Processor
from relay.app import build_relay
from relay.consumer.pool import ConsumerPool, share_queues
from relay.consumer.runner import Consumer, ConsumerSettings
from relay.consumer.topology import Topology
from relay.settings import RelaySettings

EVENT_TYPE = "bench.consumed"


def _effects_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "bench_effects",
        metadata,
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
    )


def _fill(amqp_url: str, topology: Topology, n: int, keys: int) -> None:
    """Declare the topology and publish N messages (i-th of key i % K carries n = i // K)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        topology.declare(channel)
        for i in range(n):
            key = f"k{i % keys}"
            channel.basic_publish(
                topology.exchange,
                EVENT_TYPE,
                json.dumps({"key": key, "n": i // keys}).encode(),
                pika.BasicProperties(
                    message_id=str(uuid.uuid4()),
                    type=EVENT_TYPE,
                    delivery_mode=2,
                    headers={"ordering-key": key, "outbox-seq": i + 1, "event-version": 1},
                ),
            )
        deadline = time.monotonic() + 120
        while _depth(channel, topology) < n:
            if time.monotonic() > deadline:
                raise RuntimeError("the broker did not enqueue every benchmark message")
            connection.sleep(0.1)
    finally:
        connection.close()


def _count(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def _depth(channel: Any, topology: Topology) -> int:
    return sum(
        int(channel.queue_declare(q, passive=True).method.message_count or 0)
        for q in topology.queue_names
    )


def _delete(amqp_url: str, topology: Topology) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        for queue in topology.queue_names:
            channel.queue_delete(queue)
        channel.exchange_delete(topology.hash_exchange)
        channel.exchange_delete(topology.exchange)
    finally:
        connection.close()


def _topology(queues: int) -> Topology:
    suffix = uuid.uuid4().hex[:8]
    return Topology(
        group=f"bench-consumer-{suffix}", exchange=f"bench-ex-{suffix}", routing_keys=(EVENT_TYPE,),
        queues=queues,
    )  # fmt: skip


def run_inbox(config: argparse.Namespace, engine: sa.Engine, schema: str) -> dict[str, Any]:
    topology = _topology(config.queues)
    metadata = sa.MetaData(schema=schema)
    inbox = Inbox(metadata, schema=schema, prefix=f"inbox_{topology.group[-8:]}")
    effects = _effects_table(metadata)
    handlers = Handlers(topology.group, inbox=inbox)

    @handlers.on(EVENT_TYPE)
    def apply(message: Message, session: Session) -> None:
        payload = message.payload()
        session.execute(sa.insert(effects).values(key=payload["key"], n=payload["n"]))

    inbox.create(engine)
    metadata.create_all(engine, tables=[effects])
    try:
        _fill(config.amqp_url, topology, config.n, config.keys)
        settings = ConsumerSettings(
            amqp_url=config.amqp_url, name=topology.group, exchange=topology.exchange,
            queues=config.queues, cleanup_interval=3600,
        )  # fmt: skip
        consumers = [
            Consumer(
                Processor(handlers, sessionmaker(engine)),
                settings,
                queue_indexes=queues,
                housekeeping=index == 0,
            )
            for index, queues in enumerate(share_queues(config.queues, config.threads))
        ]
        pool = ConsumerPool(consumers)  # each connects in its own thread: timed too
        started = time.perf_counter()
        with _in_thread(pool.run, pool.request_stop, "bench-consumers"):
            while _count(engine, effects) < config.n:
                time.sleep(0.01)
        seconds = time.perf_counter() - started
        with engine.connect() as conn:
            rows = conn.execute(sa.select(effects.c.key, effects.c.n).order_by(effects.c.id)).all()
        per_key: dict[str, list[int]] = {}
        for key, n in rows:
            per_key.setdefault(key, []).append(n)
        ok = len(rows) == config.n and all(v == sorted(set(v)) for v in per_key.values())
        return {"seconds": seconds, "rate": config.n / seconds, "ok": ok}
    finally:
        _delete(config.amqp_url, topology)
        metadata.drop_all(engine, tables=[effects, *inbox.tables])


def run_raw(
    config: argparse.Namespace, engine: sa.Engine, schema: str, *, with_transaction: bool
) -> dict[str, Any]:
    topology = _topology(config.queues)
    metadata = sa.MetaData(schema=schema)
    effects = _effects_table(metadata)
    metadata.create_all(engine, tables=[effects])
    try:
        _fill(config.amqp_url, topology, config.n, config.keys)
        connection = pika.BlockingConnection(pika.URLParameters(config.amqp_url))
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1)
        received = 0

        def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
            nonlocal received
            if with_transaction:
                payload = json.loads(body)
                with engine.begin() as conn:
                    conn.execute(sa.insert(effects).values(key=payload["key"], n=payload["n"]))
            ch.basic_ack(method.delivery_tag)
            received += 1

        for queue in topology.queue_names:
            channel.basic_consume(queue, on_message, auto_ack=False)
        started = time.perf_counter()
        while received < config.n:
            connection.process_data_events(time_limit=0.05)  # type: ignore[arg-type]
        seconds = time.perf_counter() - started
        connection.close()
        return {"seconds": seconds, "rate": config.n / seconds, "ok": True}
    finally:
        _delete(config.amqp_url, topology)
        metadata.drop_all(engine, tables=[effects])


@contextlib.contextmanager
def _in_thread(run: Callable[[], None], stop: Callable[[], None], name: str) -> Iterator[None]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop()
        thread.join(30)
    if thread.is_alive():
        raise RuntimeError(f"{name} did not stop within 30 s")
    if errors:
        raise errors[0]


def run_latency(config: argparse.Namespace, engine: sa.Engine, schema: str) -> dict[str, Any]:
    """Commit-to-handler-commit latency at a steady rate, relay and consumer running."""
    topology = _topology(config.queues)
    metadata = sa.MetaData(schema=schema)
    box = Outbox(metadata, schema=schema, table=f"outbox_{topology.group[-8:]}")
    inbox = Inbox(metadata, schema=schema, prefix=f"inbox_{topology.group[-8:]}")
    effects = _effects_table(metadata)
    handlers = Handlers(topology.group, inbox=inbox)
    applied_at: dict[str, float] = {}

    @handlers.on(EVENT_TYPE)
    def apply(message: Message, session: Session) -> None:
        payload = message.payload()
        session.execute(sa.insert(effects).values(key=payload["key"], n=payload["n"]))

    def on_result(message: Message, result: Any, seconds: float) -> None:
        applied_at.setdefault(message.message_id, time.time())  # after the commit

    box.create(engine)
    inbox.create(engine)
    metadata.create_all(engine, tables=[effects])
    committed_at: dict[str, float] = {}
    try:
        settings = ConsumerSettings(
            amqp_url=config.amqp_url, name=topology.group, exchange=topology.exchange,
            queues=config.queues, cleanup_interval=3600,
        )  # fmt: skip
        processor = Processor(handlers, sessionmaker(engine), on_result=on_result)
        consumer = Consumer(processor, settings)
        consumer.start()  # the topology exists before the relay publishes
        relay = build_relay(
            RelaySettings(
                database_url=config.database_url, amqp_url=config.amqp_url, schema=schema,
                table=box.name, exchange=topology.exchange, name=f"{topology.group}-relay",
            )
        )  # fmt: skip
        with (
            _in_thread(consumer.run, consumer.request_stop, "bench-consumer"),
            _in_thread(relay.run, relay.request_stop, "bench-relay"),
        ):
            total = int(config.rate * config.seconds)
            started = time.monotonic()
            for i in range(total):
                delay = started + i / config.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                key = f"k{i % config.keys}"
                event = Event(type=EVENT_TYPE, key=key, payload={"key": key, "n": i // config.keys})
                with engine.begin() as conn:
                    outbox.write(conn, event, outbox=box)
                committed_at[str(event.id)] = time.time()
            reached = total / (time.monotonic() - started)
            deadline = time.monotonic() + 60
            while len(applied_at) < total:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{total - len(applied_at)} events never reached a handler")
                time.sleep(0.05)
        latencies = sorted(
            (applied_at[i] - committed_at[i]) * 1000 for i in committed_at if i in applied_at
        )
        with engine.connect() as conn:
            rows = conn.execute(sa.select(effects.c.key, effects.c.n).order_by(effects.c.id)).all()
        per_key: dict[str, list[int]] = {}
        for key, n in rows:
            per_key.setdefault(key, []).append(n)
        ok = len(rows) == total and all(v == sorted(set(v)) for v in per_key.values())
        return {
            "rate": config.rate,
            "reached": reached,
            "events": total,
            "p50_ms": _percentile(latencies, 0.50),
            "p95_ms": _percentile(latencies, 0.95),
            "p99_ms": _percentile(latencies, 0.99),
            "ok": ok,
        }
    finally:
        _delete(config.amqp_url, topology)
        metadata.drop_all(engine, tables=[effects, *inbox.tables])
        box.drop(engine)


def _percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(fraction * len(values)))] if values else float("nan")


def _ensure_database(database_url: str) -> None:
    import psycopg

    url = sa.make_url(database_url)
    admin = f"host={url.host or '127.0.0.1'} port={url.port or 5432} user={url.username}"
    admin += " dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (url.database,)
        ).fetchone():
            conn.execute(f'CREATE DATABASE "{url.database}"')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--queues", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="consumer threads (inbox)")
    parser.add_argument("--latency", action="store_true", help="also commit-to-handler latency")
    parser.add_argument("--rate", type=float, default=200.0, help="events/s for --latency")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long for --latency")
    parser.add_argument("--quick", action="store_true", help="200 messages, 1 repeat")
    config = parser.parse_args(argv)
    if config.quick:
        config.n, config.repeat, config.rate, config.seconds = 200, 1, 50.0, 2.0
    _ensure_database(config.database_url)
    engine = create_engine(config.database_url)
    schema = f"bench_consumer_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    variants: dict[str, Callable[[], dict[str, Any]]] = {
        "inbox": lambda: run_inbox(config, engine, schema),
        "raw+tx": lambda: run_raw(config, engine, schema, with_transaction=True),
        "raw": lambda: run_raw(config, engine, schema, with_transaction=False),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    latency: dict[str, Any] | None = None
    try:
        for repeat in range(config.repeat):
            for name, variant in variants.items():  # alternate: noise hits every variant
                progress(f"consumer {name}, repeat {repeat + 1}/{config.repeat}")
                runs[name].append(variant())
        if config.latency:
            progress(f"consumer latency at {config.rate:g} events/s for {config.seconds:g} s")
            latency = run_latency(config, engine, schema)
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        engine.dispose()
    rates = {name: statistics.median(r["rate"] for r in results) for name, results in runs.items()}
    ok = all(r["ok"] for results in runs.values() for r in results)
    ok = ok and (latency is None or latency["ok"])
    print(f"consumer throughput: {config.n} messages, {config.keys} keys, {config.queues} queues, "
          f"{config.threads} consumer threads, median of {config.repeat}")  # fmt: skip
    for name, rate in rates.items():
        print(f"  {name:<7} {rate:8.0f} msg/s  inbox/{name}: {rates['inbox'] / rate:.2f}x")
    if latency is not None:
        print(
            f"commit to handler commit at {latency['rate']:g}/s ({latency['reached']:.0f}/s "
            f"reached, {latency['events']} events): p50 {latency['p50_ms']:.1f} ms, "
            f"p95 {latency['p95_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms"
        )
    print("  runs checked (each message once, in key order):", "ok" if ok else "FAILED")
    print(json.dumps({"rates": rates, "runs": runs, "latency": latency, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
