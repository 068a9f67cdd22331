"""Building a consumer from the CLI's values: the handlers reference, the engine, the runner."""

from __future__ import annotations

import dataclasses
import importlib
import traceback
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from outbox.consumer import Handlers, Inbox, Processor, RetryPolicy
from relay.consumer.metrics import ConsumerMetrics
from relay.consumer.pool import ConsumerPool, share_queues
from relay.consumer.runner import Consumer, ConsumerSettings
from relay.errors import ConfigError, DatabaseUnavailableError, SchemaMissingError
from relay.session_options import SessionCheck, url_options
from relay.urls import mask_text, mask_url

CONNECT_TIMEOUT = 10


def load_handlers(reference: str) -> Handlers:
    """`package.module:attribute`, a `Handlers` or a function without arguments returning one."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(
            f"handlers reference {reference!r} must look like 'package.module:handlers' (the "
            "module that creates your outbox.consumer.Handlers, a colon, its variable name)"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(
                f"cannot import {module_name!r} from {reference!r}: no module named {exc.name!r} "
                "(is the application installed, or its directory on PYTHONPATH?)"
            ) from None
        raise ConfigError(f"importing {module_name!r} failed: {_last_line(exc)}") from exc
    except Exception as exc:
        raise ConfigError(f"importing {module_name!r} failed: {_last_line(exc)}") from exc
    try:
        value: Any = getattr(module, attribute)
    except AttributeError:
        names = sorted(n for n, v in vars(module).items() if isinstance(v, Handlers))
        hint = f" (it has: {', '.join(names)})" if names else ""
        raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}{hint}") from None
    if callable(value) and not isinstance(value, Handlers):
        try:
            value = value()
        except Exception as exc:
            raise ConfigError(f"{reference}() failed: {_last_line(exc)}") from exc
    if not isinstance(value, Handlers):
        raise ConfigError(
            f"{reference} is a {type(value).__name__}, not an outbox.consumer.Handlers"
        )
    if not value.types:
        raise ConfigError(
            f"{reference} (consumer {value.name!r}) has no handlers: register some with "
            "@handlers.on(EventClass)"
        )
    return value


def _last_line(exc: BaseException) -> str:
    return traceback.format_exception_only(exc)[-1].strip()


def create_engine(database_url: str, *, application_name: str, threads: int = 1) -> sa.Engine:
    """An engine for handlers: durable commits (the ack follows them), checked connections."""
    try:
        url = sa.make_url(database_url)
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        connect_args: dict[str, Any] = {}
        check: SessionCheck | None = None
        if url.get_backend_name() == "postgresql":
            # The user's options (`url_options`: the URL's, a libpq service's, PGOPTIONS),
            # with the marker that tells whether they arrived: behind PgBouncer they do not,
            # and a lost search_path would point the handlers at another inbox.
            url, options = url_options(url)
            if options:
                check = SessionCheck(url, options, timeout=CONNECT_TIMEOUT)
                connect_args["options"] = check.options
            connect_args |= {
                "application_name": application_name[:63],
                "connect_timeout": CONNECT_TIMEOUT,
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                # psycopg prepares a statement run five times on the session; behind a pooler
                # in transaction mode (PgBouncer) the next transaction runs on another server
                # session, where it does not exist ("prepared statement _pg3_0 does not exist").
                "prepare_threshold": None,
            }
        # A connection per consumer thread, one for housekeeping, and some to spare.
        pool = (
            {"pool_size": threads + 1, "max_overflow": 5}
            if url.get_backend_name() != "sqlite"
            else {}
        )
        engine = sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args, **pool)
        if check is not None:
            check.listen(engine)
        return engine
    except Exception as exc:
        raise ConfigError(
            f"--database-url {mask_url(database_url)} is not usable: {mask_text(str(exc))}"
        ) from exc


def check_tables(engine: sa.Engine, inbox: Inbox) -> None:
    """SchemaMissingError naming the tables to create, or DatabaseUnavailableError."""
    try:
        with engine.connect() as connection:
            inspector = sa.inspect(connection)
            missing = [
                t.name for t in inbox.tables if not inspector.has_table(t.name, schema=t.schema)
            ]
    except sa.exc.OperationalError as exc:
        raise DatabaseUnavailableError(
            f"database unavailable: {_last_line(exc.orig or exc)}"
        ) from exc
    if missing:
        raise SchemaMissingError(
            f"inbox tables missing: {', '.join(missing)}; create them with `outbox-relay inbox "
            "init-db MODULE:HANDLERS`, with handlers.inbox.create(engine), or in your migrations"
        )


@dataclasses.dataclass(frozen=True)
class ConsumerOptions:
    max_attempts: int
    retry_min: float
    retry_max: float


def build_consumers(
    handlers: Handlers,
    engine: sa.Engine,
    settings: ConsumerSettings,
    options: ConsumerOptions,
    metrics: ConsumerMetrics | None = None,
    threads: int = 1,
) -> ConsumerPool:
    """`threads` consumers sharing the group's queues; the first one does the housekeeping."""
    try:
        policy = RetryPolicy(options.max_attempts, options.retry_min, options.retry_max)
    except Exception as exc:
        raise ConfigError(str(exc)) from exc
    sessions = sessionmaker(engine)
    consumers = []
    for index, queues in enumerate(share_queues(settings.queues, threads)):
        processor = Processor(
            handlers,
            sessions,
            policy=policy,
            on_result=metrics.result if metrics is not None else None,
        )
        name = settings.name if threads == 1 else f"{settings.name}/{index}"
        consumers.append(
            Consumer(
                processor,
                dataclasses.replace(settings, name=name),
                metrics=metrics,
                queue_indexes=queues,
                housekeeping=index == 0,
            )
        )
    return ConsumerPool(consumers)
