"""The `outbox-relay` command group: logging options, and every command under it."""

from __future__ import annotations

from typing import Any

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

LOG_LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)
LOG_FORMATS = click.Choice(["text", "json"])
_LOGGING = "outbox.logging"
"""`click.Context.meta` key (of the root context) of the logging settings in force."""


class RootGroup(OutboxGroup):
    """`outbox-relay`: every command added to it also takes the logging options."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        _with_logging_options(cmd)
        super().add_command(cmd, name)


@click.group(
    cls=RootGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EXIT_CODES_HELP,
)
@click.version_option(package_name="outbox-relay", prog_name="outbox-relay")
@click.option(
    "--log-level",
    envvar="OUTBOX_LOG_LEVEL",
    show_envvar=True,
    default="INFO",
    show_default=True,
    type=LOG_LEVELS,
    help="Also accepted after the command.",
)
@click.option(
    "--log-format",
    envvar="OUTBOX_LOG_FORMAT",
    show_envvar=True,
    default="text",
    show_default=True,
    type=LOG_FORMATS,
    help="json: one object per line, for log collectors. Also accepted after the command.",
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
    logging = click.get_current_context().meta.setdefault(_LOGGING, {})
    logging.update(log_level=log_level, log_format=log_format)
    configure_logging(log_level, log_format)


def _relog(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """A logging option given after the command overrides the one before it (or its variable)."""
    if value is None or param.name is None:
        return
    logging = ctx.find_root().meta.setdefault(_LOGGING, {"log_level": "INFO", "log_format": "text"})
    logging[param.name] = value
    configure_logging(logging["log_level"], logging["log_format"])


def _with_logging_options(command: click.Command) -> None:
    """Users put --log-format where they put every other option: after the command too."""
    if any(param.name == "log_level" for param in command.params):
        return
    command.params += [
        click.Option(
            ["--log-level"],
            envvar="OUTBOX_LOG_LEVEL",
            show_envvar=True,
            type=LOG_LEVELS,
            expose_value=False,
            callback=_relog,
            help="Log level (default INFO).",
        ),
        click.Option(
            ["--log-format"],
            envvar="OUTBOX_LOG_FORMAT",
            show_envvar=True,
            type=LOG_FORMATS,
            expose_value=False,
            callback=_relog,
            help="Log format, text (default) or json: one object per line.",
        ),
    ]
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _with_logging_options(sub)


for command in (run, init_db, status, dead, purge, health, demo, consume, inbox):
    main.add_command(command)
