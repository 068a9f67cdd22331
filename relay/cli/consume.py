"""`outbox-relay consume MODULE:HANDLERS`: the consumer daemon of one consumer group."""

from __future__ import annotations

import logging
import os
import signal
import socket
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from relay.cli.exits import EXIT_CODES_HELP
from relay.cli.options import (
    DURATION,
    amqp_option,
    database_url_option,
    exchange_options,
    metrics_options,
)
from relay.consumer.topology import DEFAULT_QUEUES, MAX_QUEUES, QUEUE_TYPES
from relay.errors import ConfigError
from relay.urls import mask_url

if TYPE_CHECKING:
    from relay.consumer.pool import ConsumerPool

log = logging.getLogger("relay.cli")
F = TypeVar("F", bound=Callable[..., Any])

HANDLERS_HELP = """\b
MODULE:HANDLERS names your outbox.consumer.Handlers object (or a function that returns
one), e.g. myapp.handlers:handlers. Its name is the consumer group: queues <name>.0 ...
<name>.N-1 behind the exchange <name>.hash, and the group's own inbox rows.
"""


@click.command(epilog=HANDLERS_HELP + "\n" + EXIT_CODES_HELP)
@click.argument("reference", metavar="MODULE:HANDLERS")
@database_url_option("SQLAlchemy URL of the database the handlers write to (and the inbox is in).")
@amqp_option()
@exchange_options("The relay's exchange; the group's hash exchange is bound to it.")
@click.option(
    "--queues",
    envvar="OUTBOX_CONSUMER_QUEUES",
    show_envvar=True,
    default=DEFAULT_QUEUES,
    show_default=True,
    type=click.IntRange(1, MAX_QUEUES),
    help="Queues of the group (keys are spread over them; each has one active consumer).",
)
@click.option(
    "--threads",
    envvar="OUTBOX_CONSUMER_THREADS",
    show_envvar=True,
    default=1,
    show_default=True,
    type=click.IntRange(1, MAX_QUEUES),
    help="Consumers in this process, each with its own share of the queues and its own "
    "transactions (at most --queues).",
)
@click.option(
    "--queue-type",
    envvar="OUTBOX_CONSUMER_QUEUE_TYPE",
    show_envvar=True,
    default="quorum",
    show_default=True,
    type=click.Choice(QUEUE_TYPES),
)
@click.option(
    "--max-attempts",
    envvar="OUTBOX_CONSUMER_MAX_ATTEMPTS",
    show_envvar=True,
    default=5,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Tries of a failing handler (each in a fresh transaction) before its key is parked.",
)
@click.option(
    "--retry-min",
    envvar="OUTBOX_CONSUMER_RETRY_MIN",
    show_envvar=True,
    default="100ms",
    show_default=True,
    type=DURATION,
    help="Delay before the second try (doubles each try).",
)
@click.option(
    "--retry-max",
    envvar="OUTBOX_CONSUMER_RETRY_MAX",
    show_envvar=True,
    default="5s",
    show_default=True,
    type=DURATION,
    help="Longest delay between two tries.",
)
@click.option(
    "--retention",
    envvar="OUTBOX_INBOX_RETENTION",
    show_envvar=True,
    default="7d",
    show_default=True,
    type=DURATION,
    help="Keep inbox rows (the dedup window) this long; older ones are deleted in batches.",
)
@click.option(
    "--name",
    envvar="OUTBOX_CONSUMER_NAME",
    show_envvar=True,
    default=None,
    help="This process's name in RabbitMQ's connection list and pg_stat_activity "
    "(default: host-pid-random).",
)
@metrics_options("OUTBOX_CONSUMER")
def consume(
    reference: str,
    database_url: str,
    amqp_url: str,
    exchange: str,
    exchange_type: str,
    queues: int,
    threads: int,
    queue_type: str,
    max_attempts: int,
    retry_min: float,
    retry_max: float,
    retention: float,
    name: str | None,
    metrics_port: int,
    metrics_address: str,
) -> None:
    """Apply the events of one consumer group: once each, in order per key (SIGTERM: exit 0).

    Declares the group's topology, consumes its queues and acks each message after its
    transaction committed. A failing handler is retried, then its key is parked (see
    `outbox-relay inbox parked`). On SIGTERM or SIGINT it finishes the message in hand, acks
    it and exits 0. Run as many processes as you like: each queue has one active consumer,
    and another process takes over when it goes away.

    With --metrics-port: messages by outcome, handling latency, parked messages and keys,
    messages waiting in each queue.
    """
    from relay.consumer.app import (
        ConsumerOptions,
        build_consumers,
        check_tables,
        create_engine,
        load_handlers,
    )
    from relay.consumer.metrics import ConsumerMetrics
    from relay.consumer.runner import ConsumerSettings
    from relay.logs import add_log_context

    if retry_min > retry_max:
        raise ConfigError(
            f"--retry-min ({retry_min:g}s) must not exceed --retry-max ({retry_max:g}s)"
        )
    if retention <= 0:
        raise ConfigError("--retention must be more than 0")
    if threads > queues:
        raise ConfigError(f"--threads ({threads}) must not exceed --queues ({queues})")
    stopping: list[int] = []
    pools: list[ConsumerPool] = []

    def stop(signum: int, frame: object) -> None:
        log.info("received %s: finishing the message in hand", signal.Signals(signum).name)
        stopping.append(signum)
        for built in pools:
            built.request_stop()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    engine = None
    try:
        handlers = load_handlers(reference)
        add_log_context(consumer=handlers.name)
        name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        engine = create_engine(
            database_url, application_name=f"outbox-consumer:{name}", threads=threads
        )
        check_tables(engine, handlers.inbox)
        metrics = ConsumerMetrics(handlers.name) if metrics_port else None
        settings = ConsumerSettings(
            amqp_url=amqp_url,
            name=name,
            exchange=exchange,
            exchange_type=exchange_type,
            queues=queues,
            queue_type=queue_type,
            retention=retention,
        )
        pool = build_consumers(
            handlers,
            engine,
            settings,
            ConsumerOptions(max_attempts, retry_min, retry_max),
            metrics,
            threads=threads,
        )
        pools.append(pool)
        if stopping:
            return
        if metrics is not None:
            try:
                metrics.serve(metrics_port, metrics_address)
            except OSError as exc:
                raise ConfigError(
                    f"--metrics-port {metrics_port}: cannot listen on {metrics_address}: "
                    f"{exc.strerror or exc}"
                ) from exc
        log.info(
            "consumer %s of group %r: database %s, broker %s",
            name,
            handlers.name,
            mask_url(database_url),
            mask_url(amqp_url),
        )
        pool.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if engine is not None:
            engine.dispose()
