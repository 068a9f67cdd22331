"""Option types and the options several commands share (each maps an OUTBOX_* variable)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from relay.broker_urls import join_amqp_urls
from relay.cli.exits import META_AMQP_URL, META_DATABASE_URL
from relay.errors import ConfigError
from relay.settings import (
    DEFAULT_EXCHANGE,
    DEFAULT_EXCHANGE_TYPE,
    EXCHANGE_TYPES,
    parse_duration,
)
from relay.urls import check_amqp_url, check_database_url

F = TypeVar("F", bound=Callable[..., Any])

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


def checked_url(key: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """Check a URL the same way in every command (exit 2, naming the forms that work), and
    keep it where the error handler finds it, to name it (masked) in messages."""
    check = check_database_url if key == META_DATABASE_URL else check_amqp_url

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return value
        try:
            check(value)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
        ctx.meta[key] = value
        return value

    return callback


def database_url_option(help: str) -> Callable[[F], F]:
    """--database-url (env OUTBOX_DATABASE_URL), checked at the edge; `help` says which."""
    return click.option(
        "--database-url",
        envvar="OUTBOX_DATABASE_URL",
        show_envvar=True,
        required=True,
        callback=checked_url(META_DATABASE_URL),
        help=help,
    )


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
    return database_url_option(
        "SQLAlchemy URL of the application database, e.g. "
        "postgresql://user:pass@host/db or sqlite:///app.db."
    )(f)


def amqp_option(default: str | None = None) -> Callable[[F], F]:
    check = checked_url(META_AMQP_URL)

    def joined(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        # Repeated options (and lists in each) become one comma-separated list, checked whole.
        return check(ctx, param, join_amqp_urls(value) if value else None)

    # No `default=None` on a required option: click then takes None as a given value and
    # skips its "Missing option" check.
    defaults: dict[str, Any] = (
        {"required": True} if default is None else {"default": (default,), "show_default": True}
    )
    return click.option(
        "--amqp-url",
        envvar="OUTBOX_AMQP_URL",
        show_envvar=True,
        multiple=True,
        callback=joined,
        help="RabbitMQ URL, e.g. amqp://user:pass@host:5672/%2F. For a cluster, list its "
        "nodes (comma-separated, or the option repeated): the relay connects to the first "
        "that answers and moves to the next when its node goes away.",
        **defaults,
    )


def exchange_options(help: str) -> Callable[[F], F]:
    """`--exchange` and `--exchange-type`, the same for every command that names the exchange."""

    def decorate(f: F) -> F:
        f = click.option(
            "--exchange-type",
            envvar="OUTBOX_EXCHANGE_TYPE",
            show_envvar=True,
            default=DEFAULT_EXCHANGE_TYPE,
            show_default=True,
            type=click.Choice(EXCHANGE_TYPES),
        )(f)
        return click.option(
            "--exchange",
            envvar="OUTBOX_EXCHANGE",
            show_envvar=True,
            default=DEFAULT_EXCHANGE,
            show_default=True,
            help=help,
        )(f)

    return decorate


DEFAULT_METRICS_ADDRESS = "127.0.0.1"


def metrics_options(envvar_prefix: str) -> Callable[[F], F]:
    """`--metrics-port` and `--metrics-address` (`<prefix>_METRICS_PORT`, ...), for every
    daemon: loopback by default, every interface only when asked for."""

    def decorate(f: F) -> F:
        f = click.option(
            "--metrics-address",
            envvar=f"{envvar_prefix}_METRICS_ADDRESS",
            show_envvar=True,
            default=DEFAULT_METRICS_ADDRESS,
            show_default=True,
            help="Address the metrics endpoint listens on (0.0.0.0: every interface).",
        )(f)
        return click.option(
            "--metrics-port",
            envvar=f"{envvar_prefix}_METRICS_PORT",
            show_envvar=True,
            default=0,
            show_default=True,
            type=click.IntRange(0, 65535),
            help="Serve Prometheus metrics on http://ADDRESS:PORT/metrics (0: off).",
        )(f)

    return decorate


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
