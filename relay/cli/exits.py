"""Exit codes, and the one place that turns errors into a message and an exit code."""

from __future__ import annotations

import logging
import sys
from typing import Any, NoReturn

import click

from relay.errors import (
    BrokerConfigError,
    BrokerUnavailableError,
    ConfigError,
    DatabaseUnavailableError,
    RelayError,
    SchemaMissingError,
)
from relay.urls import mask_text, mask_url

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DATABASE = 3
EXIT_BROKER = 4
EXIT_SCHEMA = 5
EXIT_TOPOLOGY = 6
EXIT_LOCKED = 7
EXIT_DEAD_LETTERS = 8

EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 error (e.g. an event id that does not exist or is not dead, a "
    "question not confirmed, a failed demo); 2 bad usage or option value; 3 database "
    "unreachable; 4 broker unreachable; 5 outbox tables missing (run init-db); 6 broker "
    "refused the relay's topology; 7 another relay is running on the same SQLite database; 8 "
    "dead letters exist (status --fail-on-dead)."
)

META_DATABASE_URL = "outbox.database_url"
"""`click.Context.meta` key of the database URL given, to name it (masked) in messages."""
META_AMQP_URL = "outbox.amqp_url"
"""`click.Context.meta` key of the broker URL given, to name it (masked) in messages."""

log = logging.getLogger("relay.cli")


def fail(code: int, message: str) -> NoReturn:
    click.secho(f"error: {mask_text(message)}", fg="red", err=True)
    sys.exit(code)


def exit_if_dead(dead: int) -> None:
    """`status --fail-on-dead`: alerting scripts and health probes see dead letters in the exit
    code (after the status was printed)."""
    if dead:
        click.secho(
            f"error: {dead} dead letter{'s' if dead != 1 else ''}: see `outbox-relay dead list`",
            fg="red",
            err=True,
        )
        sys.exit(EXIT_DEAD_LETTERS)


def exit_code_for(exc: BaseException) -> int:
    from relay.sqlite_lock import DatabaseLockedError

    if isinstance(exc, DatabaseLockedError):
        return EXIT_LOCKED
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
                    database_url=ctx.meta.get(META_DATABASE_URL),
                    amqp_url=ctx.meta.get(META_AMQP_URL),
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
