"""The `outbox-relay` command group: logging options, and every command under it."""

from __future__ import annotations

import click

from relay.cli.consume import consume
from relay.cli.dead import dead
from relay.cli.demo import demo
from relay.cli.exits import EXIT_CODES_HELP, OutboxGroup
from relay.cli.health import health
from relay.cli.inbox import inbox
from relay.cli.maintenance import init_db, purge
from relay.cli.run import run
from relay.cli.status import status
from relay.logs import configure_logging


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


for command in (run, init_db, status, dead, purge, health, demo, consume, inbox):
    main.add_command(command)
