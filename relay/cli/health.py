"""`outbox-relay health`: can the database and the broker be reached?"""

from __future__ import annotations

import sys

import click

from relay.cli.database import open_admin
from relay.cli.exits import EXIT_CODES_HELP, EXIT_ERROR, exit_code_for
from relay.cli.options import amqp_option, database_options, exchange_options, json_option
from relay.cli.render import emit_json


@click.command(
    epilog="""\b
--json prints {"ok": bool, "database": {"ok": bool, "detail": str},
               "broker": {"ok": bool, "detail": str},
               "exchange": {"ok": bool, "detail": str} (once the broker answered)}
"""
    + "\n\n"
    + EXIT_CODES_HELP
)
@database_options
@amqp_option()
@exchange_options("The exchange run publishes to: checked as run would declare it.")
@click.option(
    "--declare-exchange/--no-declare-exchange",
    envvar="OUTBOX_DECLARE_EXCHANGE",
    show_envvar=True,
    default=True,
    show_default=True,
    help="As for run: with --no-declare-exchange the exchange must exist.",
)
@json_option
def health(
    database_url: str,
    table: str,
    schema: str | None,
    amqp_url: str,
    exchange: str,
    exchange_type: str,
    declare_exchange: bool,
    as_json: bool,
) -> None:
    """Check the database (with the outbox tables), the broker and the exchange.

    Exit 0 only if the database answers, the outbox tables exist, the broker accepts a
    connection and `run` would accept its exchange (same --exchange, --exchange-type and
    --declare-exchange as run; nothing is created); otherwise the exit code of the first
    failure (6: run would exit 6 too). One line per check.
    """
    from relay.exchange_check import check_exchange
    from relay.health import check_broker, check_database

    with open_admin(database_url, table, schema, "health") as admin:
        checks = [check_database(admin, database_url), check_broker(amqp_url)]
    if checks[1].ok:
        checks.append(check_exchange(amqp_url, exchange, exchange_type, declare=declare_exchange))
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
