"""`outbox-relay run`: the relay daemon, with its options and signal handling."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from relay.cli.exits import EXIT_CODES_HELP
from relay.cli.options import (
    DURATION,
    amqp_option,
    database_options,
    exchange_options,
    metrics_options,
)
from relay.errors import ConfigError
from relay.settings import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DB_TIMEOUT,
    DEFAULT_LEASE,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_RETENTION,
    DEFAULT_RETRY_MAX,
    DEFAULT_RETRY_MIN,
    DEFAULT_RUN_LENGTH,
    RelaySettings,
)
from relay.sqlite_lock import single_relay
from relay.urls import mask_url

if TYPE_CHECKING:
    from relay.relay import Relay

log = logging.getLogger("relay.cli")

"""Metrics stay on this host unless a wider address is chosen explicitly."""


@click.command(epilog=EXIT_CODES_HELP)
@database_options
@amqp_option()
@exchange_options("Exchange events are published to.")
@click.option(
    "--declare-exchange/--no-declare-exchange",
    envvar="OUTBOX_DECLARE_EXCHANGE",
    show_envvar=True,
    default=True,
    show_default=True,
    help="Declare the exchange (durable) at start.",
)
@click.option(
    "--batch-size",
    envvar="OUTBOX_BATCH_SIZE",
    show_envvar=True,
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    type=click.IntRange(2, 10_000),
    help="Events leased per claim.",
)
@click.option(
    "--run-length",
    envvar="OUTBOX_RUN_LENGTH",
    show_envvar=True,
    default=DEFAULT_RUN_LENGTH,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="Most events of one key leased per claim (a claim shares its batch among its keys).",
)
@click.option(
    "--max-in-flight",
    envvar="OUTBOX_MAX_IN_FLIGHT",
    show_envvar=True,
    default=DEFAULT_MAX_IN_FLIGHT,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Most unconfirmed messages at once.",
)
@click.option(
    "--max-in-flight-per-key",
    envvar="OUTBOX_MAX_IN_FLIGHT_PER_KEY",
    show_envvar=True,
    default=1,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Most unconfirmed messages of one key. Above 1, per-key order holds only while the "
    "broker accepts every message (see the README).",
)
@click.option(
    "--max-attempts",
    envvar="OUTBOX_MAX_ATTEMPTS",
    show_envvar=True,
    default=DEFAULT_MAX_ATTEMPTS,
    show_default=True,
    type=click.IntRange(1, 1_000_000),
    help="Publish attempts before an event is dead.",
)
@click.option(
    "--retry-min",
    envvar="OUTBOX_RETRY_MIN",
    show_envvar=True,
    default=f"{DEFAULT_RETRY_MIN:g}s",
    show_default=True,
    type=DURATION,
    help="First retry delay (doubles each attempt, with jitter).",
)
@click.option(
    "--retry-max",
    envvar="OUTBOX_RETRY_MAX",
    show_envvar=True,
    default=f"{DEFAULT_RETRY_MAX:g}s",
    show_default=True,
    type=DURATION,
    help="Longest retry delay.",
)
@click.option(
    "--dead-letters-hold-key/--dead-letters-skip",
    envvar="OUTBOX_DEAD_LETTERS_HOLD_KEY",
    show_envvar=True,
    default=True,
    show_default=True,
    help="Whether a dead event holds back the later events of its key until requeued or purged.",
)
@click.option(
    "--poll-interval",
    envvar="OUTBOX_POLL_INTERVAL",
    show_envvar=True,
    default=f"{DEFAULT_POLL_INTERVAL:g}s",
    show_default=True,
    type=DURATION,
    help="Longest wait between looks at an idle table (LISTEN/NOTIFY wakes the relay sooner).",
)
@click.option(
    "--lease",
    envvar="OUTBOX_LEASE",
    show_envvar=True,
    default=f"{DEFAULT_LEASE:g}s",
    show_default=True,
    type=DURATION,
    help="How long claimed events stay reserved without renewal; a crashed relay's "
    "events are taken over after it.",
)
@click.option(
    "--db-timeout",
    envvar="OUTBOX_DB_TIMEOUT",
    show_envvar=True,
    default=f"{DEFAULT_DB_TIMEOUT:g}s",
    show_default=True,
    type=DURATION,
    help="Longest wait for one database call; past it the connection is dropped and the "
    "relay retries (a silent network link would otherwise hang it).",
)
@click.option(
    "--retention",
    envvar="OUTBOX_RETENTION",
    show_envvar=True,
    default=f"{DEFAULT_RETENTION / 3600:g}h",
    show_default=True,
    type=DURATION,
    help="Keep published rows this long (0: delete at once).",
)
@click.option(
    "--listen/--no-listen",
    envvar="OUTBOX_LISTEN",
    show_envvar=True,
    default=True,
    show_default=True,
    help="Use LISTEN/NOTIFY on PostgreSQL (turn off behind PgBouncer in transaction mode).",
)
@click.option(
    "--name",
    envvar="OUTBOX_RELAY_NAME",
    show_envvar=True,
    default=None,
    help="This relay's name in status and in the broker's connection list "
    "(default: host-pid-random).",
)
@click.option(
    "--until-empty",
    envvar="OUTBOX_UNTIL_EMPTY",
    show_envvar=True,
    is_flag=True,
    help="Exit once nothing is ready to publish (scripts and tests).",
)
@metrics_options("OUTBOX")
def run(metrics_port: int, metrics_address: str, **options: Any) -> None:
    """Run the relay daemon (SIGTERM or SIGINT: drain, exit 0).

    On SIGTERM or SIGINT it stops claiming, waits for outstanding confirms (bounded by the
    stop timeout), gives back what it did not publish, and exits 0.

    With --metrics-port, Prometheus metrics are served at /metrics: events published, failed
    and dead-lettered by type, pending and dead counts and the oldest pending age (read from
    the database at most every 15 s), publish and commit-to-confirm latency histograms.
    """
    from relay.admin import Admin
    from relay.app import build_relay
    from relay.logs import add_log_context
    from relay.prometheus import PrometheusMetrics

    name = options.pop("name")
    if name:
        options["name"] = name
    try:
        settings = RelaySettings(**options)
    except ConfigError as exc:
        raise option_error(exc) from None
    add_log_context(relay=settings.name)
    # Handlers first: a SIGTERM while the relay is still starting (connecting, checking the
    # schema) must end in a clean exit 0 too, not in death by the default handler.
    stopping: list[int] = []
    relays: list[Relay] = []  # the relay, once built

    def stop(signum: int, frame: object) -> None:
        log.info("received %s: draining", signal.Signals(signum).name)
        stopping.append(signum)
        for built in relays:
            built.request_stop()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop_metrics: Callable[[], None] | None = None
    relay: Relay | None = None
    held = contextlib.ExitStack()
    try:
        held.enter_context(single_relay(settings.database_url))  # SQLite: one relay at a time
        metrics = PrometheusMetrics() if metrics_port else None
        relay = build_relay(settings, metrics=metrics)
        relays.append(relay)
        relay.store.check()
        if metrics is not None:
            metrics.watch_outbox(Admin(relay.store.engine, relay.store.outbox).gauges)
            try:
                stop_metrics = metrics.serve(metrics_port, metrics_address).stop
            except OSError as exc:
                raise ConfigError(
                    f"--metrics-port {metrics_port}: cannot listen on {metrics_address}: "
                    f"{exc.strerror or exc}"
                ) from exc
            log.info("metrics on http://%s:%d/metrics", metrics_address, metrics_port)
        if stopping:
            log.info("relay %s stopped before it started", settings.name)
            return
        log.info(
            "relay %s starting: database %s, broker %s, exchange %r",
            settings.name,
            mask_url(settings.database_url),
            mask_url(settings.amqp_url),
            settings.exchange,
        )
        relay.run()
        log.info("relay %s stopped", settings.name)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if stop_metrics is not None:
            stop_metrics()
        if relay is not None:
            relay.store.engine.dispose()
        held.close()


def option_error(exc: ConfigError) -> ConfigError:
    """A settings error names the field; say which option sets it."""
    fields = {f.name for f in dataclasses.fields(RelaySettings)}
    text = str(exc)
    first = text.split(" ", 1)[0]
    if first not in fields:
        return exc

    def option(match: re.Match[str]) -> str:
        name = match.group(0)
        return f"--{name.replace('_', '-')}" if name in fields else name

    # The leading field, and any other field named in the message (those with an underscore:
    # plain words like "name" or "lease" also appear in prose).
    rest = re.sub(r"\b[a-z]+_[a-z_]+\b", option, text[len(first) :])
    return ConfigError(f"--{first.replace('_', '-')}{rest}")
