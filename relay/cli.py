"""`outbox-relay`: run the relay, and inspect and repair the outbox.

Every subcommand is one plain function: parse the options, call `relay.admin` (or the relay),
render a table for people or JSON for scripts. Errors are turned into a message and an exit
code in one place, `OutboxGroup.invoke`.

Exit codes (documented in the README and in --help):
  0 success   1 error (unknown event, nothing confirmed, demo failed)   2 bad usage or option
  3 database unreachable   4 broker unreachable   5 outbox tables missing
  6 broker refused the relay's topology
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import re
import signal
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from relay.errors import (
    BrokerConfigError,
    BrokerUnavailableError,
    ConfigError,
    DatabaseUnavailableError,
    RelayError,
    SchemaMissingError,
)
from relay.logs import configure_logging
from relay.settings import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EXCHANGE,
    DEFAULT_EXCHANGE_TYPE,
    DEFAULT_LEASE,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_RETENTION,
    DEFAULT_RETRY_MAX,
    DEFAULT_RETRY_MIN,
    DEFAULT_RUN_LENGTH,
    EXCHANGE_TYPES,
    RelaySettings,
    parse_duration,
)
from relay.urls import mask_text, mask_url

if TYPE_CHECKING:
    from relay.admin import Admin, DeadLetter, EventDetail, OutboxStatus, Plan, Selector

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DATABASE = 3
EXIT_BROKER = 4
EXIT_SCHEMA = 5
EXIT_TOPOLOGY = 6

EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 error (e.g. an event id that does not exist or is not dead, a "
    "question not confirmed, a failed demo); 2 bad usage or option value; 3 database "
    "unreachable; 4 broker unreachable; 5 outbox tables missing (run init-db); 6 broker "
    "refused the relay's topology."
)
DB_TIMEOUT = 10.0
"""Seconds an operator command waits for the database (connect and each statement)."""
SHOWN_IN_DRY_RUN = 20
LAST_ERROR_WIDTH = 70

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("relay.cli")

_META_DATABASE_URL = "outbox.database_url"
_META_AMQP_URL = "outbox.amqp_url"

# click >= 8.4 makes ParamType generic; older versions (which pyproject allows) do not.
if TYPE_CHECKING:
    _FloatParam = click.ParamType[float]
    _TimeParam = click.ParamType[dt.datetime]
    _UuidParam = click.ParamType[uuid.UUID]
else:
    _FloatParam = _TimeParam = _UuidParam = click.ParamType


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- option types ------------------------------------------------------------------------------


class Duration(_FloatParam):
    """'500ms', '30s', '5m', '2h', '7d' or a number of seconds."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(str(value))
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


class Since(_TimeParam):
    """A duration back from now ('2h': within the last two hours) or an ISO 8601 time."""

    name = "time"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> dt.datetime:
        if isinstance(value, dt.datetime):
            return value
        text = str(value).strip()
        try:
            return utcnow() - dt.timedelta(seconds=parse_duration(text))
        except ConfigError:
            pass
        try:
            moment = dt.datetime.fromisoformat(text)
        except ValueError:
            self.fail(
                f"{text!r} is neither a duration back from now (e.g. 30m, 2h, 7d) nor an "
                "ISO 8601 time (e.g. 2024-05-01T12:00:00Z)",
                param,
                ctx,
            )
        return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment


class EventId(_UuidParam):
    name = "event_id"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> uuid.UUID:
        if isinstance(value, uuid.UUID):
            return value
        try:
            return uuid.UUID(str(value).strip())
        except ValueError:
            self.fail(
                f"{value!r} is not an event id: ids are UUIDs, as `dead list` shows them",
                param,
                ctx,
            )


DURATION = Duration()
SINCE = Since()
EVENT_ID = EventId()


# -- shared options ----------------------------------------------------------------------------


def _remember(key: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """Keep a URL where the error handler finds it, to name it (masked) in messages."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        ctx.meta[key] = value
        return value

    return callback


def database_options(f: F) -> F:
    f = click.option(
        "--schema",
        envvar="OUTBOX_SCHEMA",
        show_envvar=True,
        default=None,
        help="Database schema of the outbox table (default: the connection's search path).",
    )(f)
    f = click.option(
        "--table",
        envvar="OUTBOX_TABLE",
        show_envvar=True,
        default="outbox",
        show_default=True,
        help="Name of the outbox table.",
    )(f)
    f = click.option(
        "--database-url",
        envvar="OUTBOX_DATABASE_URL",
        show_envvar=True,
        required=True,
        callback=_remember(_META_DATABASE_URL),
        help="SQLAlchemy URL of the application database, e.g. "
        "postgresql://user:pass@host/db or sqlite:///app.db.",
    )(f)
    return f


def amqp_option(default: str | None = None) -> Callable[[F], F]:
    return click.option(
        "--amqp-url",
        envvar="OUTBOX_AMQP_URL",
        show_envvar=True,
        required=default is None,
        default=default,
        show_default=default is not None,
        callback=_remember(_META_AMQP_URL),
        help="RabbitMQ URL, e.g. amqp://user:pass@host:5672/%2F.",
    )


def json_option(f: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON for scripts (see below)."
    )(f)


def selector_options(f: F) -> F:
    f = click.option(
        "--since",
        type=SINCE,
        default=None,
        help="Only dead letters whose last failure is this recent: a duration back from now "
        "(2h) or an ISO 8601 time.",
    )(f)
    f = click.option("--key", default=None, help="Only dead letters of this ordering key.")(f)
    f = click.option("--type", "type_", default=None, help="Only dead letters of this type.")(f)
    f = click.option("--all", "everything", is_flag=True, help="Every dead letter.")(f)
    f = click.argument("ids", nargs=-1, type=EVENT_ID)(f)
    return f


# -- errors: the one place that turns them into messages and exit codes -----------------------


def fail(code: int, message: str) -> NoReturn:
    click.secho(f"error: {mask_text(message)}", fg="red", err=True)
    sys.exit(code)


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, SchemaMissingError):
        return EXIT_SCHEMA
    if isinstance(exc, DatabaseUnavailableError):
        return EXIT_DATABASE
    if isinstance(exc, BrokerUnavailableError):
        return EXIT_BROKER
    if isinstance(exc, BrokerConfigError):
        return EXIT_TOPOLOGY
    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    return EXIT_ERROR


def explain(
    exc: RelayError, *, database_url: str | None = None, amqp_url: str | None = None
) -> str:
    """The error, plus which URL and which variable to look at."""
    message = str(exc)
    if isinstance(exc, DatabaseUnavailableError | SchemaMissingError) and database_url:
        message += f"\n  database: {mask_url(database_url)} (--database-url / OUTBOX_DATABASE_URL)"
    if isinstance(exc, BrokerUnavailableError | BrokerConfigError) and amqp_url:
        message += f"\n  broker: {mask_url(amqp_url)} (--amqp-url / OUTBOX_AMQP_URL)"
    return message


class OutboxGroup(click.Group):
    """Turns the errors of every subcommand into a message and a documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RelayError as exc:
            log.debug("command failed", exc_info=True)
            fail(
                exit_code_for(exc),
                explain(
                    exc,
                    database_url=ctx.meta.get(_META_DATABASE_URL),
                    amqp_url=ctx.meta.get(_META_AMQP_URL),
                ),
            )
        except Exception as exc:
            from outbox.errors import OutboxError

            if isinstance(exc, OutboxError):
                fail(EXIT_USAGE, str(exc))
            import sqlalchemy as sa

            if isinstance(exc, sa.exc.SQLAlchemyError):
                log.debug("database error", exc_info=True)
                cause = getattr(exc, "orig", None) or exc
                lines = str(cause).strip().splitlines() or [type(cause).__name__]
                fail(EXIT_ERROR, f"database error: {lines[0]}")
            raise


# -- rendering ---------------------------------------------------------------------------------


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned columns, headers first; the last column is never padded."""
    table = [list(headers), *[list(row) for row in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


def format_time(value: dt.datetime | None) -> str:
    from relay.admin import as_utc

    moment = as_utc(value)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ") if moment is not None else "-"


def shorten(text: str | None, width: int) -> str:
    if not text:
        return "-"
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


# -- helpers for the commands ------------------------------------------------------------------


@contextlib.contextmanager
def open_admin(database_url: str, table: str, schema: str | None, purpose: str) -> Iterator[Admin]:
    from outbox.errors import OutboxError
    from outbox.schema import Outbox
    from relay.admin import Admin
    from relay.store import create_engine

    try:
        box = Outbox(table=table, schema=schema)
    except OutboxError as exc:
        raise ConfigError(str(exc)) from None
    try:
        engine = create_engine(
            database_url, application_name=f"outbox-relay:{purpose}", db_timeout=DB_TIMEOUT
        )
    except Exception as exc:  # a malformed URL or an unknown driver
        raise ConfigError(f"--database-url {mask_url(database_url)} is not usable: {exc}") from exc
    try:
        yield Admin(engine, box)
    finally:
        engine.dispose()


def make_selector(
    ids: tuple[uuid.UUID, ...],
    everything: bool,
    type_: str | None,
    key: str | None,
    since: dt.datetime | None,
) -> Selector:
    from relay.admin import Selector

    return Selector(ids=ids, everything=everything, type=type_, key=key, since=since)


def confirm(question: str) -> None:
    """Ask on the terminal; anything but yes (or no terminal to ask on) changes nothing."""
    try:
        ok = click.confirm(question, default=False, err=True)
    except click.Abort:
        click.echo(err=True)
        ok = False
    if not ok:
        fail(EXIT_ERROR, "not confirmed: nothing was changed (pass --yes to skip the question)")


@contextlib.contextmanager
def progress_bar(total: int, label: str, batch: int) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr for long repairs, only when a person watches a terminal."""
    if total <= batch or not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update


# -- the command group -------------------------------------------------------------------------


@click.group(
    cls=OutboxGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EXIT_CODES_HELP,
)
@click.option(
    "--log-level",
    envvar="OUTBOX_LOG_LEVEL",
    show_envvar=True,
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option(
    "--log-format",
    envvar="OUTBOX_LOG_FORMAT",
    show_envvar=True,
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="json: one object per line, for log collectors.",
)
def main(log_level: str, log_format: str) -> None:
    """Forward transactional-outbox events to RabbitMQ, and operate the outbox.

    \b
    Start here:
      outbox-relay init-db            create the outbox tables
      outbox-relay run                the relay daemon
      outbox-relay status             backlog, dead letters, active relays
      outbox-relay dead list          dead letters; then `dead show`, `dead requeue`
      outbox-relay health             can the database and the broker be reached?
      outbox-relay demo               the whole loop on local services

    Connection and relay options can also be set with the OUTBOX_* variables shown in each
    command's --help.
    """
    configure_logging(log_level, log_format)


@main.command(epilog=EXIT_CODES_HELP)
@database_options
@amqp_option()
@click.option(
    "--exchange",
    envvar="OUTBOX_EXCHANGE",
    show_envvar=True,
    default=DEFAULT_EXCHANGE,
    show_default=True,
    help="Exchange events are published to.",
)
@click.option(
    "--exchange-type",
    envvar="OUTBOX_EXCHANGE_TYPE",
    show_envvar=True,
    default=DEFAULT_EXCHANGE_TYPE,
    show_default=True,
    type=click.Choice(EXCHANGE_TYPES),
)
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
    type=click.IntRange(1, 10_000),
    help="Events leased per claim.",
)
@click.option(
    "--run-length",
    envvar="OUTBOX_RUN_LENGTH",
    show_envvar=True,
    default=DEFAULT_RUN_LENGTH,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="Most events of one key leased per claim.",
)
@click.option(
    "--max-in-flight",
    envvar="OUTBOX_MAX_IN_FLIGHT",
    show_envvar=True,
    default=DEFAULT_MAX_IN_FLIGHT,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Most unconfirmed messages at once (one per key at most).",
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
@click.option(
    "--metrics-port",
    envvar="OUTBOX_METRICS_PORT",
    show_envvar=True,
    default=0,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Serve Prometheus metrics on http://ADDRESS:PORT/metrics (0: off).",
)
@click.option(
    "--metrics-address",
    envvar="OUTBOX_METRICS_ADDRESS",
    show_envvar=True,
    default="0.0.0.0",
    show_default=True,
    help="Address the metrics endpoint listens on.",
)
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
    from relay.prometheus import PrometheusMetrics

    name = options.pop("name")
    if name:
        options["name"] = name
    try:
        settings = RelaySettings(**options)
    except ConfigError as exc:
        raise option_error(exc) from None
    metrics = PrometheusMetrics() if metrics_port else None
    relay = build_relay(settings, metrics=metrics)
    stop_metrics: Callable[[], None] | None = None
    previous: dict[signal.Signals, Any] = {}
    try:
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

        def stop(signum: int, frame: object) -> None:
            log.info("received %s: draining", signal.Signals(signum).name)
            relay.request_stop()

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
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
        relay.store.engine.dispose()


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


@main.command("init-db", epilog=EXIT_CODES_HELP)
@database_options
@click.option("--sql", "print_sql", is_flag=True, help="Print the DDL instead of running it.")
def init_db(database_url: str, table: str, schema: str | None, print_sql: bool) -> None:
    """Create the outbox tables, indexes and triggers.

    Idempotent: creates only what is missing. With --sql, prints the DDL for teams that apply
    migrations themselves.
    """
    with open_admin(database_url, table, schema, "init-db") as admin:
        if print_sql:
            for statement in admin.outbox.ddl_statements(admin.engine.dialect):
                click.echo(f"{statement};\n")
            return
        admin.create_tables()
    click.echo(f"outbox tables ready: {admin.outbox.qualified_name} ({mask_url(database_url)})")


# -- status ------------------------------------------------------------------------------------


@main.command(
    epilog="""\b
--json prints one object:
  {"table": str, "checked_at": ISO time,
   "pending": int        every pending row, including the next two,
   "in_flight": int      pending and leased by a relay,
   "waiting_retry": int  pending, waiting for its next attempt,
   "dead": int, "published": int (rows kept for retention),
   "oldest_pending_age_seconds": float or null,
   "keys_held_back": int keys whose later rows wait behind a dead or retrying row
                         (counted as if dead letters hold their key, the default),
   "active_relays": [{"name", "host", "pid", "started_at", "heartbeat_at"}]}

"""
    + EXIT_CODES_HELP
)
@database_options
@json_option
def status(database_url: str, table: str, schema: str | None, as_json: bool) -> None:
    """Show the backlog, dead letters, held keys and active relays.

    Counts pending (and of those, in flight and waiting for retry), dead and published
    events, the age of the oldest pending event, the keys held back behind a dead or retrying
    event, and the relays whose heartbeat is less than 30 s old.
    """
    with open_admin(database_url, table, schema, "status") as admin:
        result = admin.status()
    if as_json:
        emit_json(result.to_json())
        return
    for line in render_status(result):
        click.echo(line)


def render_status(s: OutboxStatus) -> list[str]:
    rows = [
        ["pending", str(s.pending), ""],
        ["  in flight", str(s.in_flight), "leased by a relay"],
        ["  waiting for retry", str(s.waiting_retry), ""],
        ["dead", str(s.dead), "see `outbox-relay dead list`" if s.dead else ""],
        ["published", str(s.published), "kept for retention"],
        ["oldest pending", format_age(s.oldest_pending_age), ""],
        ["keys held back", str(s.keys_held_back), "behind a dead or retrying event"],
        ["active relays", str(len(s.relays)), "heartbeat in the last 30 s"],
    ]
    lines = [f"outbox {s.table} at {format_time(s.checked_at)}", ""]
    lines += format_table(["", "", ""], rows)[1:]
    if s.relays:
        lines.append("")
        lines += [
            "  " + line
            for line in format_table(
                ["RELAY", "HOST", "PID", "STARTED", "LAST HEARTBEAT"],
                [
                    [
                        r.name,
                        r.host,
                        str(r.pid),
                        format_time(r.started_at),
                        format_time(r.heartbeat_at),
                    ]
                    for r in s.relays
                ],
            )
        ]
    return lines


# -- dead letters ------------------------------------------------------------------------------

_DEAD_LETTER_JSON = """\b
--json prints a list of objects, in write order:
  {"id": str, "seq": int, "type": str, "key": str or null, "routing_key": str,
   "attempts": int, "last_error": str or null, "occurred_at": ISO time,
   "last_failed_at": ISO time or null}
"""


@main.group(cls=OutboxGroup, epilog=EXIT_CODES_HELP)
def dead() -> None:
    """Dead letters: events that ran out of publish attempts.

    \b
    A dead event holds back the later events of its key (unless the relay runs with
    --dead-letters-skip) until it is requeued or purged:
      outbox-relay dead list                     what is dead, and why
      outbox-relay dead show ID                  one in full, with its error history
      outbox-relay dead requeue ID... | --all    publish again (same id, same place in order)
      outbox-relay dead purge ID... | --all      delete, with the error history
    """


@dead.command("list", epilog=_DEAD_LETTER_JSON + "\n\n" + EXIT_CODES_HELP)
@database_options
@json_option
@click.option("--type", "type_", default=None, help="Only dead letters of this type.")
@click.option("--key", default=None, help="Only dead letters of this ordering key.")
@click.option(
    "--since",
    type=SINCE,
    default=None,
    help="Only dead letters whose last failure is this recent: a duration back from now (2h) "
    "or an ISO 8601 time.",
)
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Show at most this many.",
)
def dead_list(
    database_url: str,
    table: str,
    schema: str | None,
    as_json: bool,
    type_: str | None,
    key: str | None,
    since: dt.datetime | None,
    limit: int,
) -> None:
    """List dead letters in write order, with their attempts and last error."""
    from relay.admin import Selector

    selector = Selector.filters(type=type_, key=key, since=since)
    with open_admin(database_url, table, schema, "dead-list") as admin:
        letters = admin.dead_letters(selector, limit=limit)
        total = (
            len(letters)
            if len(letters) < limit
            else admin.plan(selector or Selector(everything=True)).count
        )
    if as_json:
        emit_json([letter.to_json() for letter in letters])
        return
    if not letters:
        click.echo("no dead letters" + (" match" if selector else ""))
        return
    for line in render_dead_letters(letters):
        click.echo(line)
    if total > len(letters):
        click.echo(f"\nshowing {len(letters)} of {total} dead letters: use --limit to see more")


def render_dead_letters(letters: Sequence[DeadLetter]) -> list[str]:
    return format_table(
        ["ID", "TYPE", "KEY", "ATTEMPTS", "LAST FAILURE", "LAST ERROR"],
        [
            [
                str(d.id),
                d.type,
                d.key or "-",
                str(d.attempts),
                format_time(d.last_failed_at),
                shorten(d.last_error, LAST_ERROR_WIDTH),
            ]
            for d in letters
        ],
    )


@dead.command(
    "show",
    epilog="""\b
--json prints the whole outbox row as one object (every column; "payload" and "headers"
decoded from JSON) plus "failures": [{"attempt", "failed_at", "relay", "error"}], oldest first.

"""
    + EXIT_CODES_HELP,
)
@database_options
@json_option
@click.argument("event_id", type=EVENT_ID)
def dead_show(
    database_url: str, table: str, schema: str | None, as_json: bool, event_id: uuid.UUID
) -> None:
    """Show one event in full: payload, headers and its error history.

    Usually a dead letter, but any event can be shown (its status says where it is).
    """
    with open_admin(database_url, table, schema, "dead-show") as admin:
        detail = admin.event(event_id)
    if as_json:
        emit_json(detail.to_json())
        return
    for line in render_event(detail):
        click.echo(line)


def render_event(detail: EventDetail) -> list[str]:
    data = detail.to_json()
    fields = [
        ("event", data["id"]),
        ("status", data["status"]),
        ("type", data["type"]),
        ("key", data["key"] or "-"),
        ("aggregate", f"{data['aggregate_type'] or '-'} {data['aggregate_id'] or ''}".strip()),
        ("routing key", data["routing_key"]),
        ("correlation id", data["correlation_id"] or "-"),
        ("version", str(data["version"])),
        ("seq", str(data["seq"])),
        ("occurred at", data["occurred_at"] or "-"),
        ("attempts", str(data["attempts"])),
        ("next attempt", data["next_attempt_at"] or "-"),
        ("published at", data["published_at"] or "-"),
        ("last error", data["last_error"] or "-"),
        ("headers", json.dumps(data["headers"], ensure_ascii=False)),
    ]
    width = max(len(label) for label, _ in fields)
    lines = [f"{label:<{width}}  {value}" for label, value in fields]
    payload = json.dumps(data["payload"], indent=2, ensure_ascii=False)
    lines += ["payload:", *["  " + line for line in payload.splitlines()]]
    if detail.failures:
        lines.append(f"failures ({len(detail.failures)}, oldest first):")
        lines += [
            "  " + line
            for line in format_table(
                ["ATTEMPT", "FAILED AT", "RELAY", "ERROR"],
                [
                    [str(f.attempt), format_time(f.failed_at), f.relay or "-", f.error]
                    for f in detail.failures
                ],
            )
        ]
    else:
        lines.append("failures: none recorded")
    return lines


@dead.command("requeue", epilog=EXIT_CODES_HELP)
@database_options
@selector_options
@click.option("--dry-run", is_flag=True, help="Show what would be requeued; change nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before requeueing several.")
def dead_requeue(
    database_url: str,
    table: str,
    schema: str | None,
    ids: tuple[uuid.UUID, ...],
    everything: bool,
    type_: str | None,
    key: str | None,
    since: dt.datetime | None,
    dry_run: bool,
    yes: bool,
) -> None:
    """Publish dead letters again, by id or by selection.

    Select with event ids, or --all, or any of --type T, --key K, --since TIME (combined
    with AND). Each goes back to pending with the same event id (so consumers deduplicate
    it) and the same place in its key's order, attempts 0 and no lease; the relay then
    publishes it before the later events of its key.

    Asks before touching more than one event unless --yes. Named ids are all or nothing: an
    id that does not exist or is not dead changes nothing (exit 1). Selections work in
    batches of 1,000 rows per transaction, with a progress bar on a terminal.
    """
    selector = make_selector(ids, everything, type_, key, since)
    with open_admin(database_url, table, schema, "dead-requeue") as admin:
        plan = admin.plan(selector)
        if not preflight(admin, plan, "requeue", dry_run):
            return
        if plan.count > 1 and not yes:
            confirm(
                f"Requeue {plan_size(plan)}? They will be published again, "
                "in their original order per key."
            )
        with progress_bar(plan.count, "requeueing", admin.batch_size) as progress:
            done = admin.requeue(plan, progress)
    click.echo(
        f"requeued {plan_size(plan, done)}: pending again with their original ids and order, "
        "attempts reset to 0"
    )


@dead.command("purge", epilog=EXIT_CODES_HELP)
@database_options
@selector_options
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; change nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def dead_purge(
    database_url: str,
    table: str,
    schema: str | None,
    ids: tuple[uuid.UUID, ...],
    everything: bool,
    type_: str | None,
    key: str | None,
    since: dt.datetime | None,
    dry_run: bool,
    yes: bool,
) -> None:
    """Delete dead letters and their error history.

    Select with event ids, or --all, or any of --type T, --key K, --since TIME (combined
    with AND). They are never published; the later events of their keys are then no longer
    held back. Always asks first unless --yes. Named ids are all or nothing (exit 1 if one does not
    exist or is not dead). Works in batches of 1,000 rows per transaction.
    """
    selector = make_selector(ids, everything, type_, key, since)
    with open_admin(database_url, table, schema, "dead-purge") as admin:
        plan = admin.plan(selector)
        if not preflight(admin, plan, "delete", dry_run):
            return
        if not yes:
            confirm(f"Delete {plan_size(plan)} and their failure history? This cannot be undone.")
        with progress_bar(plan.count, "deleting", admin.batch_size) as progress:
            done = admin.purge_dead(plan, progress)
    click.echo(f"deleted {plan_size(plan, done)} and their failure history")


def plan_size(plan: Plan, count: int | None = None) -> str:
    count = plan.count if count is None else count
    return f"{plural(count, 'dead letter')} ({plural(plan.keys, 'key')})"


def preflight(admin: Admin, plan: Plan, verb: str, dry_run: bool) -> bool:
    """Say when nothing matches; for a dry run show what would change. True: go ahead."""
    if plan.count == 0:
        click.echo(f"no dead letters match ({plan.selector.describe()}): nothing to {verb}")
        return False
    if not dry_run:
        return True
    click.echo(f"dry run: would {verb} {plan_size(plan)}, in write order:")
    shown = admin.dead_letters(plan.selector, limit=SHOWN_IN_DRY_RUN)
    for line in render_dead_letters(shown):
        click.echo("  " + line)
    if plan.count > len(shown):
        click.echo(f"  ... and {plan.count - len(shown)} more")
    click.echo("nothing was changed")
    return False


# -- retention ---------------------------------------------------------------------------------


@main.command(epilog=EXIT_CODES_HELP)
@database_options
@click.option(
    "--older-than",
    required=True,
    type=DURATION,
    help="Delete rows published longer ago than this, e.g. 7d (0: every published row).",
)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; change nothing.")
def purge(
    database_url: str, table: str, schema: str | None, older_than: float, dry_run: bool
) -> None:
    """Delete published events older than --older-than.

    Published rows are kept for --retention by the relay, which also deletes them by itself;
    this is for doing it now. Pending and dead events are never touched. Works in batches of
    1,000 rows per transaction.
    """
    cutoff = utcnow() - dt.timedelta(seconds=older_than)
    with open_admin(database_url, table, schema, "purge") as admin:
        count = admin.count_published(cutoff)
        if dry_run:
            click.echo(
                f"dry run: would delete {plural(count, 'published event')} "
                f"(published before {format_time(cutoff)}); nothing was changed"
            )
            return
        with progress_bar(count, "deleting", admin.batch_size) as progress:
            done = admin.purge_published(cutoff, progress)
    click.echo(
        f"deleted {plural(done, 'published event')} (published before {format_time(cutoff)})"
    )


# -- health ------------------------------------------------------------------------------------


@main.command(
    epilog="""\b
--json prints {"ok": bool, "database": {"ok": bool, "detail": str},
               "broker": {"ok": bool, "detail": str}}
"""
    + "\n\n"
    + EXIT_CODES_HELP
)
@database_options
@amqp_option()
@json_option
def health(database_url: str, table: str, schema: str | None, amqp_url: str, as_json: bool) -> None:
    """Check the database (with the outbox tables) and the broker.

    Exit 0 only if the database answers, the outbox tables exist and the broker accepts a
    connection; otherwise the exit code of the first failure. One line per service.
    """
    from relay.health import check_broker, check_database

    with open_admin(database_url, table, schema, "health") as admin:
        checks = [check_database(admin, database_url), check_broker(amqp_url)]
    failed = [c for c in checks if not c.ok]
    if as_json:
        emit_json({"ok": not failed, **{c.service: c.to_json() for c in checks}})
    else:
        for c in checks:
            click.echo(f"{c.service:<8}  {'ok  ' if c.ok else 'FAIL'}  {c.detail}")
    for c in failed:
        if c.error is not None:
            sys.exit(exit_code_for(c.error))
    if failed:
        sys.exit(EXIT_ERROR)


# -- demo --------------------------------------------------------------------------------------


@main.command(epilog=EXIT_CODES_HELP)
@click.option(
    "--database-url",
    envvar="OUTBOX_DATABASE_URL",
    show_envvar=True,
    default="postgresql+psycopg://root@127.0.0.1:5432/outbox_demo",
    show_default=True,
    callback=_remember(_META_DATABASE_URL),
    help="PostgreSQL database for the demo (created if missing).",
)
@amqp_option(default="amqp://guest:guest@127.0.0.1:5672/%2F")
@click.option(
    "--schema",
    default="outbox_demo",
    show_default=True,
    help="Schema the demo drops and creates afresh (refused if it holds other tables).",
)
@click.option(
    "--orders", default=5, show_default=True, type=click.IntRange(1, 200), help="Orders to place."
)
def demo(database_url: str, amqp_url: str, schema: str, orders: int) -> None:
    """Run the whole loop on the local services and show what arrived.

    A sample application (an ORM aggregate Order with outbox.install) places, pays and ships
    a few orders, one transaction each, and rolls one transaction back; the relay publishes
    the outbox to a fresh exchange; a queue bound to it receives the events. Exit 0 only if
    every committed event arrived, in order per key, and the rolled-back one did not.
    """
    from relay.demo import render, run_demo

    report = run_demo(
        database_url=database_url,
        amqp_url=amqp_url,
        schema=schema,
        orders=orders,
        say=click.echo,
    )
    for line in render(report):
        click.echo(line)
    if not report.ok:
        fail(EXIT_ERROR, "the demo did not deliver every committed event in order (see above)")
    click.echo(
        f"\ninspect it: outbox-relay status --database-url {mask_url(database_url)} "
        f"--schema {schema}"
    )


if __name__ == "__main__":
    main(prog_name="outbox-relay")
