"""`outbox-relay demo`: the whole job end to end on the local PostgreSQL and RabbitMQ.

A small order application (an ORM aggregate with `outbox.install`) places, pays and ships a few
orders, each step in its own transaction, and rolls one transaction back. The relay then runs
in this process until the outbox is empty, a private queue bound to a private exchange receives
what it published, and the report compares the two: every committed event delivered, in write
order per key, and nothing from the rolled-back transaction.

Then the application's handlers consume the same events as a consumer group would in
production, through the real runner (`relay.consumer.runner.Consumer`, stepped in this
process): a consistent-hash exchange, quorum queues with a single active consumer, and the
inbox in the demo's schema. A stock handler takes one item per order placed, an email
handler records a mail per order paid or shipped. One message already applied is then
published again with the same message_id, as a relay that lost a confirm would, and the
consumer skips it as a duplicate. The report checks what the handlers applied (read back
from their tables): every committed event once, in write order per key, none from the
rolled-back transaction, and the duplicate not applied twice.

Everything the demo creates is its own: a fresh schema (dropped and created again each run,
and only if it holds nothing but the demo's tables), an exchange, queues and a consumer group
with unique names, deleted at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import psycopg
import sqlalchemy as sa
from pika.exchange_type import ExchangeType
from psycopg import sql
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import outbox
from outbox import AggregateRoot, Event, Outbox
from outbox.consumer import (
    Handlers,
    Inbox,
    InboxUnavailableError,
    Message,
    Outcome,
    Processor,
    Result,
    RetryPolicy,
)
from relay.app import build_relay
from relay.consumer.runner import Consumer, ConsumerSettings
from relay.errors import ConfigError, DatabaseUnavailableError, RelayError
from relay.health import open_broker
from relay.relay import Relay
from relay.session_options import dropped_user_options, refused, url_options, where
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
CONSUMER_QUEUES = 4
CONSUMER_DEADLINE = 30.0
"""Seconds the consumer may take to apply what the relay published (it needs well under 1)."""
PRODUCT = "demo-widget"
STOCK_START = 100

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


# -- the consuming application: its handlers, their tables, the inbox -------------------------


@dataclasses.dataclass(frozen=True)
class Shop:
    """The consumer group of the demo: stock and email handlers, their tables, the inbox."""

    handlers: Handlers
    metadata: sa.MetaData
    stock: sa.Table
    stock_moves: sa.Table
    emails: sa.Table

    def create(self, engine: sa.Engine) -> None:
        with engine.begin() as conn:
            self.metadata.create_all(conn)
            conn.execute(sa.insert(self.stock).values(product=PRODUCT, quantity=STOCK_START))


def build_shop(name: str, schema: str) -> Shop:
    """The handlers, registered as an application registers them (`@handlers.on(...)`).

    Both effect tables number their rows from one sequence, so the ids give the order in
    which the handlers applied the events across both tables (one key's messages are applied
    one at a time, each committed before the next starts).
    """
    metadata = sa.MetaData(schema=schema)
    applied = sa.Sequence("demo_applied_seq", metadata=metadata, schema=schema)

    def effect_columns() -> list[sa.Column[Any]]:
        return [
            sa.Column("id", sa.BigInteger, applied, primary_key=True),
            sa.Column("message_id", sa.String(36), nullable=False),
            sa.Column("order_key", sa.String(255), nullable=True),
            sa.Column("seq", sa.BigInteger, nullable=True),
        ]

    stock = sa.Table(
        "demo_stock",
        metadata,
        sa.Column("product", sa.String(50), primary_key=True),
        sa.Column("quantity", sa.Integer, nullable=False),
    )
    stock_moves = sa.Table(
        "demo_stock_move",
        metadata,
        *effect_columns(),
        sa.Column("product", sa.String(50), nullable=False),
        sa.Column("delta", sa.Integer, nullable=False),
    )
    emails = sa.Table(
        "demo_email",
        metadata,
        *effect_columns(),
        sa.Column("subject", sa.String(100), nullable=False),
    )
    handlers = Handlers(name, inbox=Inbox(metadata, schema=schema))

    def move(message: Message, session: Session, delta: int) -> None:
        session.execute(
            sa.update(stock)
            .where(stock.c.product == PRODUCT)
            .values(quantity=stock.c.quantity + delta)
        )
        session.execute(
            sa.insert(stock_moves).values(
                message_id=message.message_id,
                order_key=message.key,
                seq=message.seq,
                product=PRODUCT,
                delta=delta,
            )
        )

    @handlers.on("order.placed")
    def take_stock(message: Message, session: Session) -> None:
        move(message, session, -1)

    @handlers.on("order.cancelled")
    def put_stock_back(message: Message, session: Session) -> None:
        # Subscribed so that a leaked rolled-back cancellation would be applied and seen.
        move(message, session, +1)

    def email(message: Message, session: Session, subject: str) -> None:
        session.execute(
            sa.insert(emails).values(
                message_id=message.message_id,
                order_key=message.key,
                seq=message.seq,
                subject=subject,
            )
        )

    @handlers.on("order.paid")
    def email_receipt(message: Message, session: Session) -> None:
        email(message, session, f"payment of {message.payload()['amount']} received")

    @handlers.on("order.shipped")
    def email_shipping(message: Message, session: Session) -> None:
        email(message, session, f"shipped with {message.payload()['carrier']}")

    return Shop(handlers, metadata, stock, stock_moves, emails)


DEMO_TABLES = frozenset(
    {
        "outbox",
        "outbox_key",
        "outbox_failure",
        "outbox_relay",
        Order.__tablename__,
        "inbox",
        "inbox_keys",
        "inbox_parked",
        "demo_stock",
        "demo_stock_move",
        "demo_email",
    }
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


@dataclasses.dataclass(frozen=True, slots=True)
class Processed:
    """What the consumer runner did with one delivery (seen just before its ack)."""

    message_id: str
    key: str | None
    seq: int | None
    type: str
    outcome: Outcome


@dataclasses.dataclass(frozen=True, slots=True)
class Applied:
    """One effect a handler committed, read back from its table, in application order."""

    handler: str
    message_id: str
    key: str | None
    seq: int
    effect: str


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
    group: str  # the consumer group of the stock and email handlers
    group_queues: tuple[str, ...]
    processed: tuple[Processed, ...]  # the consumer's outcomes, in order
    applied: tuple[Applied, ...]  # the handlers' effects, in application order
    duplicate_id: str | None  # the message published a second time
    stock_left: int | None
    consumer_seconds: float

    @property
    def not_applied(self) -> list[Written]:
        """Committed events no handler applied."""
        done = {a.message_id for a in self.applied}
        return [w for w in self.written if w.id not in done]

    @property
    def applied_twice(self) -> list[str]:
        counts: dict[str, int] = {}
        for a in self.applied:
            counts[a.message_id] = counts.get(a.message_id, 0) + 1
        return [m for m, n in counts.items() if n > 1]

    @property
    def applied_unexpected(self) -> list[Applied]:
        """Effects of events that were never committed (the rolled-back one, say)."""
        committed = {w.id for w in self.written}
        return [a for a in self.applied if a.message_id not in committed]

    @property
    def applied_out_of_order(self) -> list[str]:
        """Keys whose effects were not applied in write (seq) order."""
        last: dict[str | None, int] = {}
        bad: list[str] = []
        for a in self.applied:
            if a.key is not None and a.seq < last.get(a.key, -1) and a.key not in bad:
                bad.append(a.key)
            last[a.key] = max(a.seq, last.get(a.key, -1))
        return bad

    @property
    def duplicate_skipped(self) -> bool:
        """The re-published message was seen again, skipped, and applied once only."""
        if self.duplicate_id is None:
            return False
        outcomes = [p.outcome for p in self.processed if p.message_id == self.duplicate_id]
        applied = sum(1 for a in self.applied if a.message_id == self.duplicate_id)
        return outcomes == [Outcome.HANDLED, Outcome.DUPLICATE] and applied == 1

    @property
    def placed(self) -> int:
        return sum(1 for w in self.written if w.type == "order.placed")

    @property
    def stock_ok(self) -> bool:
        return self.stock_left == STOCK_START - self.placed

    @property
    def consumer_ok(self) -> bool:
        return not (
            self.not_applied
            or self.applied_twice
            or self.applied_unexpected
            or self.applied_out_of_order
        ) and (self.duplicate_skipped and self.stock_ok)

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
    def delivery_ok(self) -> bool:
        return not (self.lost or self.unexpected or self.out_of_order)

    @property
    def ok(self) -> bool:
        return self.delivery_ok and self.consumer_ok


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
        # This connection sends no options of its own: refused, they came from the
        # environment (PGOPTIONS, a libpq service), not from the URL.
        given = url_options(url.difference_update_query(["options"]))[1]
        if refused(exc) and given:
            raise ConfigError(dropped_user_options(given, where(url))) from exc
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


@dataclasses.dataclass(frozen=True)
class _Raw:
    """A delivery as it came off the wire, to publish it again unchanged."""

    routing_key: str
    properties: pika.BasicProperties
    body: bytes


def _consume(
    connection: pika.BlockingConnection, queue: str, expected: int, timeout: float = 5.0
) -> tuple[list[Arrival], list[_Raw]]:
    """Everything in the queue: at least `expected` messages, or what came within `timeout`."""
    channel = connection.channel()
    arrivals: list[Arrival] = []
    raws: list[_Raw] = []
    deadline = time.monotonic() + timeout
    empty_polls = 0
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None or properties is None:
            if len(arrivals) >= expected:
                empty_polls += 1
                if empty_polls >= 3:  # a short look for duplicates and strays
                    break
            elif time.monotonic() >= deadline:
                break
            connection.sleep(0.1)
            continue
        raw = body.encode() if isinstance(body, str) else body or b""  # pika's stubs say str
        raws.append(_Raw(method.routing_key or "", properties, raw))
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
    return arrivals, raws


def _publish_again(connection: pika.BlockingConnection, exchange: str, raw: _Raw) -> None:
    """Publish `raw` once more, confirmed: what a relay does when a confirm was lost."""
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish(exchange, raw.routing_key, raw.body, raw.properties, mandatory=True)
    channel.close()


def _step_until(consumer: Consumer, condition: Callable[[], bool], deadline: float) -> bool:
    """Step the consumer until `condition` holds or the deadline passes; returns which."""
    while not condition():
        if time.monotonic() >= deadline:
            return False
        consumer.run_once(timeout=0.1)
    return True


def _applied(engine: sa.Engine, shop: Shop) -> list[Applied]:
    """The handlers' effects from their tables, in the order they were applied."""
    moves, emails = shop.stock_moves, shop.emails
    effects = sa.union_all(
        sa.select(
            moves.c.id,
            sa.literal("stock").label("handler"),
            moves.c.message_id,
            moves.c.order_key,
            moves.c.seq,
            sa.func.concat(moves.c.product, " ", moves.c.delta).label("effect"),
        ),
        sa.select(
            emails.c.id,
            sa.literal("email").label("handler"),
            emails.c.message_id,
            emails.c.order_key,
            emails.c.seq,
            sa.func.concat("email: ", emails.c.subject).label("effect"),
        ),
    ).subquery()
    with engine.connect() as conn:
        rows = conn.execute(sa.select(effects).order_by(effects.c.id)).all()
        return [
            Applied(
                handler=r.handler,
                message_id=r.message_id,
                key=r.order_key,
                seq=-1 if r.seq is None else r.seq,
                effect=r.effect,
            )
            for r in rows
        ]


def _stock_left(engine: sa.Engine, shop: Shop) -> int | None:
    with engine.connect() as conn:
        quantity = conn.execute(
            sa.select(shop.stock.c.quantity).where(shop.stock.c.product == PRODUCT)
        ).scalar_one_or_none()
        return None if quantity is None else int(quantity)


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
    exchange = queue = group = f"outbox-demo-{suffix}"
    shop = build_shop(group, schema)

    ensure_database(database_url)
    engine = create_engine(database_url, application_name="outbox-relay:demo", db_timeout=15)
    connection: pika.BlockingConnection | None = None
    consumer: Consumer | None = None
    channel = None
    try:
        reset_schema(engine, schema)
        box.create(engine)
        app_engine = engine.execution_options(schema_translate_map={None: schema})
        DemoBase.metadata.create_all(app_engine)
        shop.create(engine)
        say(f"database  {mask_url(database_url)}, schema {schema} (created fresh)")

        connection = open_broker(amqp_url, connection_name=f"outbox-relay:demo-{suffix}")
        channel = connection.channel()
        channel.exchange_declare(exchange, exchange_type=ExchangeType("topic"), durable=True)
        channel.queue_declare(queue, arguments={"x-expires": QUEUE_EXPIRES_MS})
        channel.queue_bind(queue, exchange, routing_key=ROUTING_PATTERN)
        say(f"broker    {mask_url(amqp_url)}: exchange {exchange} -> queue {queue}")

        processed: list[Processed] = []

        def seen(message: Message, result: Result) -> None:
            processed.append(
                Processed(
                    message.message_id, message.key, message.seq, message.type, result.outcome
                )
            )

        consumer = Consumer(
            Processor(
                shop.handlers,
                sessionmaker(engine),
                policy=RetryPolicy(max_attempts=3, retry_min=0.05, retry_max=0.2),
            ),
            ConsumerSettings(
                amqp_url=amqp_url, name=f"demo-{suffix}", exchange=exchange, queues=CONSUMER_QUEUES
            ),
            before_ack=seen,
        )
        consumer.start()  # declares the group's topology before anything is published
        topology = consumer.topology
        say(
            f"consumer  group {group}: {topology.hash_exchange} (consistent hash on ordering-key)"
            f" -> {CONSUMER_QUEUES} quorum queues, single active consumer; inbox in {schema}"
        )

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

        arrivals, raws = _consume(connection, queue, expected=len(written))

        started = time.monotonic()
        deadline = started + CONSUMER_DEADLINE
        committed_ids = {w.id for w in written}
        _step_until(consumer, lambda: committed_ids <= {p.message_id for p in processed}, deadline)
        consumer_seconds = time.monotonic() - started
        handled = sum(1 for p in processed if p.outcome is Outcome.HANDLED)
        say(f"handlers  applied {handled} messages ({consumer_seconds:.1f} s)")

        # A duplicate: the first order.placed that arrived, published again unchanged.
        duplicate = next((r for r in raws if r.properties.type == "order.placed"), None)
        duplicate_id = None if duplicate is None else duplicate.properties.message_id
        if duplicate is not None:
            _publish_again(connection, exchange, duplicate)
            say(f"duplicate published again: message {duplicate_id} ({duplicate.routing_key})")
            _step_until(
                consumer,
                lambda: any(
                    p.message_id == duplicate_id and p.outcome is Outcome.DUPLICATE
                    for p in processed
                ),
                deadline,
            )
        consumer.run_once(timeout=0.3)  # a last look for strays
        consumer.close()
        return DemoReport(
            database_url=database_url,
            schema=schema,
            exchange=exchange,
            queue=queue,
            written=tuple(written),
            rolled_back=tuple(rolled_back),
            arrivals=tuple(arrivals),
            relay_seconds=relay_seconds,
            group=group,
            group_queues=topology.queue_names,
            processed=tuple(processed),
            applied=tuple(_applied(engine, shop)),
            duplicate_id=duplicate_id,
            stock_left=_stock_left(engine, shop),
            consumer_seconds=consumer_seconds,
        )
    except pika.exceptions.AMQPError as exc:
        raise RelayError(f"broker error during the demo: {mask_text(repr(exc))}") from exc
    except InboxUnavailableError as exc:
        raise DatabaseUnavailableError(f"database unavailable during the demo: {exc}") from exc
    finally:
        if consumer is not None:
            consumer.close()
        _clean_broker(
            connection,
            [exchange, f"{group}.hash"],
            [queue, *(f"{group}.{i}" for i in range(CONSUMER_QUEUES))],
        )
        engine.dispose()


def _clean_broker(
    connection: pika.BlockingConnection | None, exchanges: list[str], queues: list[str]
) -> None:
    """Delete the demo's own queues and exchanges; never anything else. Never raises."""
    if connection is None or not connection.is_open:
        return
    try:
        channel = connection.channel()
        for queue in queues:
            channel.queue_delete(queue)
        for exchange in exchanges:
            channel.exchange_delete(exchange)
    except Exception:
        pass  # the demo's queue expires by itself; every name is unique
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
    lines += [
        "",
        f"applied by the handlers of consumer group {report.group}, in the order applied:",
    ]
    rows = [["#", "HANDLER", "ORDERING KEY", "SEQ", "TYPE", "EFFECT"]]
    for number, applied in enumerate(report.applied, 1):
        rows.append(
            [
                str(number),
                applied.handler,
                applied.key or "-",
                str(applied.seq),
                types.get(applied.message_id, "NOT COMMITTED"),
                applied.effect,
            ]
        )
    lines += ["  " + line for line in _columns(rows)]
    lines += ["", "per key, as applied:"]
    applied_by_key: dict[str | None, list[str]] = {}
    for applied in report.applied:
        kind = types.get(applied.message_id, "NOT COMMITTED")
        applied_by_key.setdefault(applied.key, []).append(f"{kind} ({applied.handler})")
    bad = set(report.applied_out_of_order)
    width = max((len(str(k)) for k in applied_by_key), default=0)
    for key, story in sorted(applied_by_key.items(), key=lambda item: str(item[0])):
        verdict = "OUT OF ORDER" if key in bad else "in order"
        lines.append(f"  {key!s:<{width}}  {' -> '.join(story)}   [{verdict}]")
    lines += ["", "what the consumer did with each delivery:"]
    outcomes: dict[str, int] = {}
    for p in report.processed:
        outcomes[p.outcome.value] = outcomes.get(p.outcome.value, 0) + 1
    lines.append("  " + ", ".join(f"{n} {outcome}" for outcome, n in outcomes.items()))
    for p in report.processed:
        if p.outcome is not Outcome.HANDLED:
            lines.append(
                f"  {p.outcome.value}: {p.type} {p.key} seq {p.seq} (message {p.message_id})"
            )

    order = "OK" if not report.out_of_order else "BROKEN for " + ", ".join(report.out_of_order)
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
        f"  applied      {_applied_line(report)}",
        f"  apply order  {_apply_order_line(report)}",
        f"  duplicate    {_duplicate_line(report)}",
        f"  stock        {_stock_line(report)}",
        f"  result       {_result_line(report)}",
    ]
    return lines


def _applied_line(report: DemoReport) -> str:
    committed = len(report.written) - len(report.not_applied)
    text = f"{committed} of {len(report.written)} committed events"
    problems = []
    if report.applied_twice:
        problems.append(f"{len(report.applied_twice)} APPLIED TWICE")
    if report.applied_unexpected:
        problems.append(f"{len(report.applied_unexpected)} NEVER COMMITTED APPLIED")
    if report.not_applied:
        problems.append(f"{len(report.not_applied)} NOT APPLIED")
    if problems:
        return f"{text}: " + ", ".join(problems)
    return f"{text}, each once; none from the rolled-back transaction"


def _apply_order_line(report: DemoReport) -> str:
    bad = report.applied_out_of_order
    return "OK: in write order per key" if not bad else "BROKEN for " + ", ".join(bad)


def _duplicate_line(report: DemoReport) -> str:
    if report.duplicate_id is None:
        return "NOT INJECTED (no order.placed arrived)"
    if report.duplicate_skipped:
        return f"message {report.duplicate_id} published again: skipped, applied once"
    return f"message {report.duplicate_id} published again: NOT SKIPPED AS A DUPLICATE"


def _stock_line(report: DemoReport) -> str:
    emails = sum(1 for a in report.applied if a.handler == "email")
    verdict = "" if report.stock_ok else f" (EXPECTED {STOCK_START - report.placed})"
    return (
        f"{PRODUCT} {STOCK_START} -> {report.stock_left}{verdict} after {report.placed} "
        f"orders placed; {emails} emails sent"
    )


def _result_line(report: DemoReport) -> str:
    if report.ok:
        return (
            "OK: every committed event arrived in order per key, and was applied once, "
            "in order; the duplicate was skipped"
        )
    failed = []
    if not report.delivery_ok:
        failed.append("delivery")
    if not report.consumer_ok:
        failed.append("consumption")
    return "FAILED (" + " and ".join(failed) + ")"


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
