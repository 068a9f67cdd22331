"""`outbox-relay demo`: the whole job end to end on the local PostgreSQL and RabbitMQ.

A small order application (an ORM aggregate with `outbox.install`) places, pays and ships a few
orders, each step in its own transaction, and rolls one transaction back. The relay then runs
in this process until the outbox is empty, a private queue bound to a private exchange receives
what it published, and the report compares the two: every committed event delivered, in write
order per key, and nothing from the rolled-back transaction.

Everything the demo creates is its own: a fresh schema (dropped and created again each run,
and only if it holds nothing but the demo's tables), an exchange and a queue with unique
names, deleted at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import uuid
from collections.abc import Callable

import pika
import pika.exceptions
import psycopg
import sqlalchemy as sa
from pika.exchange_type import ExchangeType
from psycopg import sql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import outbox
from outbox import AggregateRoot, Event, Outbox
from relay.app import build_relay
from relay.errors import ConfigError, DatabaseUnavailableError, RelayError
from relay.health import open_broker
from relay.relay import Relay
from relay.settings import RelaySettings
from relay.store import create_engine, translate_db_error
from relay.urls import mask_text, mask_url

DEFAULT_DATABASE_URL = "postgresql+psycopg://root@127.0.0.1:5432/outbox_demo"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_SCHEMA = "outbox_demo"
DEFAULT_ORDERS = 5
ROUTING_PATTERN = "order.#"
RELAY_DEADLINE = 30.0
"""Seconds the relay may take to empty the outbox before the demo stops it."""
QUEUE_EXPIRES_MS = 10 * 60 * 1000
"""The demo deletes its queue; should it crash, the broker drops the queue after this."""

CUSTOMERS = [
    ("ada", "12.50"),
    ("grace", "99.00"),
    ("linus", "7.25"),
    ("barbara", "42.00"),
    ("ken", "15.75"),
    ("margaret", "3.10"),
    ("dennis", "64.00"),
    ("frances", "28.40"),
]


class DemoBase(DeclarativeBase):
    pass


class Order(DemoBase, AggregateRoot):
    """The sample application's aggregate: its events get the key "order:<id>"."""

    __tablename__ = "demo_order"
    __aggregate_type__ = "order"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str]
    total: Mapped[str]
    status: Mapped[str] = mapped_column(default="new")

    def place(self) -> Event:
        self.status = "placed"
        return self.record("order.placed", {"customer": self.customer, "total": self.total})

    def pay(self) -> Event:
        self.status = "paid"
        return self.record("order.paid", {"amount": self.total})

    def ship(self) -> Event:
        self.status = "shipped"
        return self.record("order.shipped", {"carrier": "demo-post"})

    def cancel(self) -> Event:
        self.status = "cancelled"
        return self.record("order.cancelled", {"reason": "changed their mind"})


DEMO_TABLES = frozenset(
    {"outbox", "outbox_key", "outbox_failure", "outbox_relay", Order.__tablename__}
)


@dataclasses.dataclass(frozen=True, slots=True)
class Written:
    """An event the application committed, as the outbox holds it."""

    id: str
    key: str | None
    seq: int
    type: str


@dataclasses.dataclass(frozen=True, slots=True)
class Arrival:
    """A message as the demo's queue received it."""

    message_id: str
    key: str | None
    seq: int
    type: str
    redelivered: bool


@dataclasses.dataclass(frozen=True)
class DemoReport:
    database_url: str
    schema: str
    exchange: str
    queue: str
    written: tuple[Written, ...]  # committed events, in write order
    rolled_back: tuple[Event, ...]  # recorded in a transaction that rolled back
    arrivals: tuple[Arrival, ...]  # in arrival order
    relay_seconds: float

    @property
    def delivered(self) -> int:
        return len({a.message_id for a in self.arrivals})

    @property
    def duplicates(self) -> int:
        return len(self.arrivals) - self.delivered

    @property
    def lost(self) -> list[Written]:
        arrived = {a.message_id for a in self.arrivals}
        return [w for w in self.written if w.id not in arrived]

    @property
    def unexpected(self) -> list[Arrival]:
        committed = {w.id for w in self.written}
        return [a for a in self.arrivals if a.message_id not in committed]

    @property
    def rolled_back_arrived(self) -> list[str]:
        arrived = {a.message_id for a in self.arrivals}
        return [str(e.id) for e in self.rolled_back if str(e.id) in arrived]

    @property
    def out_of_order(self) -> list[str]:
        """Keys whose first deliveries did not arrive in write (seq) order."""
        seq_of = {w.id: w.seq for w in self.written}
        last: dict[str | None, int] = {}
        seen: set[str] = set()
        bad: list[str] = []
        for arrival in self.arrivals:
            if arrival.message_id in seen or arrival.message_id not in seq_of:
                continue
            seen.add(arrival.message_id)
            seq = seq_of[arrival.message_id]
            key_seen = arrival.key is not None and seq < last.get(arrival.key, -1)
            if key_seen and arrival.key not in bad:
                bad.append(str(arrival.key))
            last[arrival.key] = max(seq, last.get(arrival.key, -1))
        return bad

    @property
    def ok(self) -> bool:
        return not (self.lost or self.unexpected or self.out_of_order)


# -- set-up ------------------------------------------------------------------------------------


def ensure_database(database_url: str) -> None:
    """Create the database of `database_url` if it is missing (PostgreSQL only)."""
    url = sa.make_url(database_url)
    if url.get_backend_name() != "postgresql" or not url.database:
        return
    params: dict[str, str | int] = {"dbname": "postgres", "connect_timeout": 10}
    for name, value in (
        ("host", url.host),
        ("port", url.port),
        ("user", url.username),
        ("password", url.password),
    ):
        if value is not None:
            params[name] = value
    try:
        with psycopg.connect(autocommit=True, **params) as conn:  # type: ignore[arg-type]
            found = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (url.database,)
            ).fetchone()
            if found is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(url.database)))
    except psycopg.errors.DuplicateDatabase:
        pass  # created meanwhile by someone else
    except psycopg.OperationalError as exc:
        lines = mask_text(str(exc)).strip().splitlines() or ["connection failed"]
        raise DatabaseUnavailableError(f"database unavailable: {lines[0]}") from exc
    except psycopg.Error as exc:
        raise RelayError(
            f"cannot create the database {url.database!r}: {mask_text(str(exc)).strip()}; "
            "create it yourself or pass --database-url"
        ) from exc


def reset_schema(engine: sa.Engine, schema: str) -> None:
    """Drop and create `schema`, refusing if it holds tables the demo did not create."""
    try:
        with engine.begin() as conn:
            found = set(sa.inspect(conn).get_table_names(schema=schema))
            foreign = sorted(found - DEMO_TABLES)
            if foreign:
                raise ConfigError(
                    f"schema {schema!r} holds tables the demo did not create "
                    f"({', '.join(foreign[:5])}): pass --schema with a name of its own"
                )
            # `schema` passed Outbox's identifier check: plain letters, digits, underscores.
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    except sa.exc.DBAPIError as exc:
        error = translate_db_error(exc)
        if isinstance(error, RelayError):
            raise error from exc
        raise


# -- the sample application --------------------------------------------------------------------


def run_application(
    sessions: sessionmaker[sa.orm.Session], orders: int
) -> tuple[list[Event], list[Event]]:
    """Place, pay and ship `orders` orders, one transaction per step; roll one back.

    Returns (events of committed transactions, events of the rolled-back one).
    """
    committed: list[Event] = []
    ids: list[int] = []
    for customer, total in (CUSTOMERS * (orders // len(CUSTOMERS) + 1))[:orders]:
        with sessions() as session, session.begin():
            order = Order(customer=customer, total=total)
            session.add(order)
            committed.append(order.place())
        ids.append(order.id)
    for order_id in ids:
        with sessions() as session, session.begin():
            committed.append(_get(session, order_id).pay())
    # A cancellation that fails after its event row was inserted (flushed): the rollback
    # takes the row with it, so the relay never sees it.
    with sessions() as session:
        session.begin()
        cancelled = _get(session, ids[0]).cancel()
        session.flush()
        session.rollback()
    for order_id in ids:
        with sessions() as session, session.begin():
            committed.append(_get(session, order_id).ship())
    return committed, [cancelled]


def _get(session: sa.orm.Session, order_id: int) -> Order:
    order = session.get(Order, order_id)
    if order is None:  # pragma: no cover - the demo just created it
        raise RelayError(f"demo order {order_id} vanished")
    return order


def _written(engine: sa.Engine, box: Outbox) -> list[Written]:
    t = box.events
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.id, t.c.key, t.c.seq, t.c.type).order_by(t.c.seq))
        return [Written(id=str(r.id), key=r.key, seq=r.seq, type=r.type) for r in rows]


# -- the relay and the consumer ----------------------------------------------------------------


def _run_relay(relay: Relay, connection: pika.BlockingConnection) -> None:
    """Run the relay (until the outbox is empty) in a thread; keep our connection alive."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            relay.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="demo-relay", daemon=True)
    thread.start()
    deadline = time.monotonic() + RELAY_DEADLINE
    while thread.is_alive() and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.2)  # type: ignore[arg-type]
    if thread.is_alive():
        relay.request_stop()
        thread.join(relay.settings.stop_timeout + 10)
    if errors:
        raise errors[0]


def _consume(
    connection: pika.BlockingConnection, queue: str, expected: int, timeout: float = 5.0
) -> list[Arrival]:
    """Everything in the queue: at least `expected` messages, or what came within `timeout`."""
    channel = connection.channel()
    arrivals: list[Arrival] = []
    deadline = time.monotonic() + timeout
    empty_polls = 0
    while True:
        method, properties, _body = channel.basic_get(queue, auto_ack=True)
        if method is None or properties is None:
            if len(arrivals) >= expected:
                empty_polls += 1
                if empty_polls >= 3:  # a short look for duplicates and strays
                    break
            elif time.monotonic() >= deadline:
                break
            connection.sleep(0.1)
            continue
        headers = properties.headers or {}
        key = headers.get("ordering-key")
        seq = headers.get("outbox-seq")
        arrivals.append(
            Arrival(
                message_id=properties.message_id or "",
                key=None if key is None else str(key),
                seq=-1 if seq is None else int(seq),
                type=properties.type or method.routing_key or "",
                redelivered=bool(method.redelivered),
            )
        )
    channel.close()
    return arrivals


# -- the whole demo ----------------------------------------------------------------------------


def run_demo(
    *,
    database_url: str = DEFAULT_DATABASE_URL,
    amqp_url: str = DEFAULT_AMQP_URL,
    schema: str = DEFAULT_SCHEMA,
    orders: int = DEFAULT_ORDERS,
    say: Callable[[str], None] = print,
) -> DemoReport:
    """Run the demo; `say` receives one line per step. Raises RelayError when a service fails."""
    if orders < 1:
        raise ConfigError(f"orders must be 1 or more, got {orders}")
    if sa.make_url(database_url).get_backend_name() != "postgresql":
        raise ConfigError("database_url: the demo needs PostgreSQL (postgresql://...)")
    try:
        box = Outbox(schema=schema)
    except outbox.OutboxError as exc:
        raise ConfigError(str(exc)) from None
    suffix = uuid.uuid4().hex[:8]
    exchange = queue = f"outbox-demo-{suffix}"

    ensure_database(database_url)
    engine = create_engine(database_url, application_name="outbox-relay:demo", db_timeout=15)
    connection: pika.BlockingConnection | None = None
    channel = None
    try:
        reset_schema(engine, schema)
        box.create(engine)
        app_engine = engine.execution_options(schema_translate_map={None: schema})
        DemoBase.metadata.create_all(app_engine)
        say(f"database  {mask_url(database_url)}, schema {schema} (created fresh)")

        connection = open_broker(amqp_url, connection_name=f"outbox-relay:demo-{suffix}")
        channel = connection.channel()
        channel.exchange_declare(exchange, exchange_type=ExchangeType("topic"), durable=True)
        channel.queue_declare(queue, arguments={"x-expires": QUEUE_EXPIRES_MS})
        channel.queue_bind(queue, exchange, routing_key=ROUTING_PATTERN)
        say(f"broker    {mask_url(amqp_url)}: exchange {exchange} -> queue {queue}")

        sessions = sessionmaker(app_engine, expire_on_commit=False)
        outbox.install(sessions, outbox=box)
        committed, rolled_back = run_application(sessions, orders)
        say(
            f"app       {orders} orders placed, paid and shipped: {len(committed)} events in "
            f"{len(committed)} transactions; 1 transaction rolled back (order.cancelled)"
        )
        written = _written(engine, box)

        settings = RelaySettings(
            database_url=database_url,
            amqp_url=amqp_url,
            schema=schema,
            exchange=exchange,
            name=f"demo-{suffix}",
            until_empty=True,
            poll_interval=0.2,
            max_attempts=3,
            retry_min=0.1,
            retry_max=0.5,
            lease=10.0,
        )
        relay = build_relay(settings)
        started = time.monotonic()
        try:
            _run_relay(relay, connection)
        finally:
            relay.store.engine.dispose()
        relay_seconds = time.monotonic() - started
        say(f"relay     published the outbox and stopped ({relay_seconds:.1f} s)")

        arrivals = _consume(connection, queue, expected=len(written))
        return DemoReport(
            database_url=database_url,
            schema=schema,
            exchange=exchange,
            queue=queue,
            written=tuple(written),
            rolled_back=tuple(rolled_back),
            arrivals=tuple(arrivals),
            relay_seconds=relay_seconds,
        )
    except pika.exceptions.AMQPError as exc:
        raise RelayError(f"broker error during the demo: {mask_text(repr(exc))}") from exc
    finally:
        _clean_broker(connection, exchange, queue)
        engine.dispose()


def _clean_broker(connection: pika.BlockingConnection | None, exchange: str, queue: str) -> None:
    """Delete the demo's own queue and exchange; never anything else. Never raises."""
    if connection is None or not connection.is_open:
        return
    try:
        channel = connection.channel()
        channel.queue_delete(queue)
        channel.exchange_delete(exchange)
    except Exception:
        pass  # the queue expires by itself; the exchange is named uniquely
    with contextlib.suppress(Exception):
        connection.close()


# -- the report --------------------------------------------------------------------------------


def render(report: DemoReport) -> list[str]:
    """The report for people: arrivals in order, each key's story, and the verdict."""
    types = {w.id: w.type for w in report.written}
    lines = ["", "arrived, in arrival order:"]
    rows = [["#", "ORDERING KEY", "SEQ", "TYPE", "MESSAGE ID"]]
    for number, a in enumerate(report.arrivals, 1):
        rows.append(
            [str(number), a.key or "-", str(a.seq), types.get(a.message_id, a.type), a.message_id]
        )
    lines += ["  " + line for line in _columns(rows)]
    lines += ["", "per key, in arrival order:"]
    by_key: dict[str | None, list[str]] = {}
    for a in report.arrivals:
        by_key.setdefault(a.key, []).append(types.get(a.message_id, a.type))
    bad = set(report.out_of_order)
    width = max((len(str(k)) for k in by_key), default=0)
    for key, story in by_key.items():
        verdict = "OUT OF ORDER" if key in bad else "in order"
        lines.append(f"  {key!s:<{width}}  {' -> '.join(story)}   [{verdict}]")
    order = "OK" if not report.out_of_order else "BROKEN for " + ", ".join(report.out_of_order)
    result = "OK: every committed event arrived, in order per key" if report.ok else "FAILED"
    arrived = "ARRIVED" if report.rolled_back_arrived else "not delivered, as it must be"
    lines += [
        "",
        "summary:",
        f"  written      {len(report.written)} events committed",
        f"  rolled back  {len(report.rolled_back)} event ({arrived})",
        f"  delivered    {report.delivered} distinct messages",
        f"  duplicates   {report.duplicates}",
        f"  lost         {len(report.lost)}",
        f"  order        {order}",
        f"  result       {result}",
    ]
    return lines


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
