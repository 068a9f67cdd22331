"""`outbox-relay status`: backlog, dead letters, held keys and active relays."""

from __future__ import annotations

import click

from relay.cli.database import open_admin
from relay.cli.exits import EXIT_CODES_HELP, exit_if_dead
from relay.cli.options import database_options, json_option
from relay.cli.render import emit_json, render_status


@click.command(
    epilog="""\b
--json prints one object:
  {"table": str, "checked_at": ISO time,
   "pending": int        every pending row, including the next two,
   "in_flight": int      pending and leased by a relay,
   "waiting_retry": int  pending, waiting for its next attempt,
   "dead": int, "published": int (rows kept for retention),
   "oldest_pending_age_seconds": float or null,
   "keys_held_back": int keys whose later rows wait behind a dead or retrying row,
   "active_relays": [{"name", "host", "pid", "started_at", "heartbeat_at",
                      "broker_node": "host:port" or null while disconnected}],
   "schema_problems": [str]  what `outbox-relay init-db` would fix (empty when none)}

"""
    + EXIT_CODES_HELP
)
@database_options
@json_option
@click.option("--fail-on-dead", is_flag=True, help="Exit 8 if any event is dead (for alerting).")
def status(
    database_url: str, table: str, schema: str | None, as_json: bool, fail_on_dead: bool
) -> None:
    """Show the backlog, dead letters, held keys and active relays.

    Counts pending (and of those, in flight and waiting for retry), dead and published
    events, the age of the oldest pending event, the keys held back behind a dead or retrying
    event, and the relays whose heartbeat is less than 30 s old.
    """
    with open_admin(database_url, table, schema, "status") as admin:
        result = admin.status()
    if as_json:
        emit_json(result.to_json())
    else:
        for line in render_status(result):
            click.echo(line)
    if fail_on_dead:
        exit_if_dead(result.dead)
