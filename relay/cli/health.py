"""`outbox-relay health`: can the database and the broker be reached?"""

from __future__ import annotations

import sys

import click

from relay.cli.database import open_admin
from relay.cli.exits import EXIT_CODES_HELP, EXIT_ERROR, exit_code_for
from relay.cli.options import amqp_option, database_options, json_option
from relay.cli.render import emit_json


@click.command(
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
