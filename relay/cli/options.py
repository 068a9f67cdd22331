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
from relay.settings import parse_duration

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


def remember_url(key: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
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
        callback=remember_url(META_DATABASE_URL),
        help="SQLAlchemy URL of the application database, e.g. "
        "postgresql://user:pass@host/db or sqlite:///app.db.",
    )(f)
    return f


def amqp_option(default: str | None = None) -> Callable[[F], F]:
    remember = remember_url(META_AMQP_URL)

    def joined(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        # Repeated options (and lists in each) become one comma-separated list.
        return remember(ctx, param, join_amqp_urls(value) if value else None)

    return click.option(
        "--amqp-url",
        envvar="OUTBOX_AMQP_URL",
        show_envvar=True,
        multiple=True,
        required=default is None,
        default=(default,) if default is not None else None,
        show_default=default is not None,
        callback=joined,
        help="RabbitMQ URL, e.g. amqp://user:pass@host:5672/%2F. For a cluster, list its "
        "nodes (comma-separated, or the option repeated): the relay connects to the first "
        "that answers and moves to the next when its node goes away.",
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
