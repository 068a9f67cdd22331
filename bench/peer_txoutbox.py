"""txoutbox 0.2.2 as the `peer` benchmark runs it: its table, its relay, a RabbitMQ publisher.

Imported only by the `peer` benchmark's child processes and set-up, and only when the `bench`
extra is installed (`pip install -e '.[bench]'`): nothing in outbox/ or relay/ depends on it.

Its fairest configuration, read from its source (relay.py, adapters/postgres.py):

* `PostgresStorage` with its defaults: `strict_ordering=True`, the guarantee ours gives (a
  key's events are published one after another, in insertion order; it serialises claims with
  an advisory lock to keep it across workers), rows marked `done` rather than deleted (ours
  keeps published rows too), no `visibility_delay` (it would add seconds to every delivery;
  the benchmark never needs it, because each key has one writer, so insertion order is commit
  order), its asyncpg pool defaults.
* `notify_channel` set and `storage.listen(relay.wake)`: its LISTEN/NOTIFY wake-up (an AFTER
  INSERT trigger), the way its README says not to poll. Ours listens too.
* `RelayConfig()` untouched: batch 50, 10 key groups published concurrently, 5 s publish
  timeout, 50 ms to 5 s adaptive idle poll.
* It ships no RabbitMQ publisher ("bring your own broker"), so `ConfirmedPublisher` below is
  the one a careful user would write on aio-pika: a robust connection, a channel with
  publisher confirms, persistent messages, `mandatory=True` with returns raised as errors (an
  unroutable message is a failure, as for ours), `publish` returning only once the broker
  confirmed. Same exchange, routing key, body and identity headers as ours, so the same
  consumer and checker read both.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import aio_pika
import asyncpg  # type: ignore[import-untyped]
import sqlalchemy as sa
from txoutbox import Hooks, OutboxMessage, Relay
from txoutbox.adapters.postgres import PostgresStorage

from bench.common import EVENT_TYPE, payload
from tests.support.history import Written
from tests.support.rabbit import ORDERING_KEY_HEADER, SEQ_HEADER

TABLE = "outbox"


def asyncpg_dsn(database_url: str) -> str:
    """asyncpg takes a libpq URL, not SQLAlchemy's `postgresql+psycopg://`."""
    url = sa.make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def storage_options(schema: str, channel: str) -> dict[str, Any]:
    return {"schema": schema, "table": TABLE, "notify_channel": channel}


async def create_table(database_url: str, schema: str, channel: str) -> None:
    """Its DDL (`schema_sql()`: table, partial indexes, the NOTIFY trigger) in `schema`."""
    storage = await PostgresStorage.connect(
        asyncpg_dsn(database_url), min_size=1, max_size=1, **storage_options(schema, channel)
    )
    try:
        await storage.pool.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await storage.create_schema()
    finally:
        await storage.close()


def prefill(engine: sa.Engine, schema: str, count: int, keys: int, body_size: int) -> None:
    """`count` pending rows, keys interleaved like `bench_events` (not measured: plain SQL)."""
    rows = [
        {"topic": EVENT_TYPE, "key": f"k{i % keys}", "payload": _body(i, body_size)}
        for i in range(count)
    ]
    statement = sa.text(
        f'INSERT INTO "{schema}".{TABLE} (topic, key, payload) VALUES (:topic, :key, :payload)'
    )
    with engine.begin() as conn:
        conn.execute(statement, rows)


def written(engine: sa.Engine, schema: str) -> list[Written]:
    """The committed rows: the truth its deliveries are checked against (seq = its id)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f'SELECT id, key FROM "{schema}".{TABLE} ORDER BY id'))
        return [Written(id=str(r.id), key=r.key, seq=int(r.id)) for r in rows]


def count_pending(engine: sa.Engine, schema: str) -> int:
    with engine.connect() as conn:
        query = sa.text(f"SELECT count(*) FROM \"{schema}\".{TABLE} WHERE status = 'pending'")
        return int(conn.execute(query).scalar_one())


def _body(i: int, body_size: int) -> bytes:
    # The same compact JSON as ours (txoutbox.encode_payload of the same dict).
    return json.dumps(payload(i, body_size), separators=(",", ":")).encode()


class ConfirmedPublisher:
    """txoutbox's `Publisher`: one message, returns once RabbitMQ confirmed it."""

    def __init__(self, exchange: aio_pika.abc.AbstractExchange) -> None:
        self._exchange = exchange

    @classmethod
    async def connect(
        cls, amqp_url: str, exchange: str, name: str
    ) -> tuple[ConfirmedPublisher, aio_pika.abc.AbstractRobustConnection]:
        connection = await aio_pika.connect_robust(
            amqp_url, client_properties={"connection_name": name}
        )
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        declared = await channel.declare_exchange(
            exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        return cls(declared), connection

    async def publish(self, message: OutboxMessage) -> None:
        headers: dict[str, Any] = dict(message.headers)
        headers[ORDERING_KEY_HEADER] = message.key
        headers[SEQ_HEADER] = message.id
        await self._exchange.publish(
            aio_pika.Message(
                message.payload,
                headers=headers,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=str(message.id),
                timestamp=message.created_at,
                type=message.topic,
                app_id="txoutbox",
            ),
            routing_key=message.topic,
            mandatory=True,
        )


class PublishedClock(Hooks):
    """Counts confirmed messages; stops the relay once `expected` are (the backlog drained)."""

    def __init__(self, expected: int | None) -> None:
        self.expected = expected
        self.published = 0
        self.last_publish: float | None = None
        self.relay: Relay | None = None

    async def on_published(self, message: OutboxMessage) -> None:
        self.published += 1
        self.last_publish = time.perf_counter()
        if self.expected is not None and self.published >= self.expected and self.relay:
            self.relay.stop()


async def run_relay(
    database_url: str,
    amqp_url: str,
    schema: str,
    channel: str,
    exchange: str,
    on_ready: Callable[[], None],
    stop: asyncio.Event,
    clock: PublishedClock,
) -> None:
    """Its relay as its README sets one up, until `stop` is set (or `clock` stops it)."""
    storage = await PostgresStorage.connect(
        asyncpg_dsn(database_url), **storage_options(schema, channel)
    )
    publisher, connection = await ConfirmedPublisher.connect(
        amqp_url, exchange, f"bench-txoutbox-{schema}"
    )
    relay = Relay(storage, publisher, hooks=clock)
    clock.relay = relay
    listener = await storage.listen(relay.wake)
    try:
        running = asyncio.create_task(relay.run())
        on_ready()
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        relay.stop()
        await running
        stopping.cancel()
    finally:
        await listener.close()
        await connection.close()
        await storage.close()


async def write_paced(
    database_url: str,
    schema: str,
    channel: str,
    due_times: Sequence[tuple[int, float]],
    keys: int,
    body_size: int,
) -> list[tuple[str, int, float, float]]:
    """One row per transaction through its `insert(conn, ...)`, each at its due time."""
    pool = await asyncpg.create_pool(asyncpg_dsn(database_url), min_size=1, max_size=1)
    storage = PostgresStorage(pool, **storage_options(schema, channel))
    records: list[tuple[str, int, float, float]] = []
    try:
        async with pool.acquire() as conn:
            for i, due in due_times:
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                async with conn.transaction():
                    row_id = await storage.insert(
                        conn, EVENT_TYPE, payload(i, body_size), key=f"k{i % keys}"
                    )
                records.append((str(row_id), i, time.monotonic(), due))
    finally:
        await pool.close()
    return records
