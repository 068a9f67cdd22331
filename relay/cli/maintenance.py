"""`outbox-relay init-db` and `outbox-relay purge`: create the tables, delete old rows."""

from __future__ import annotations

import datetime as dt

import click

from relay.cli.database import open_admin
from relay.cli.exits import EXIT_CODES_HELP
from relay.cli.options import DURATION, database_options, utcnow
from relay.cli.render import format_time, plural
from relay.cli.terminal import progress_bar
from relay.urls import mask_url


@click.command("init-db", epilog=EXIT_CODES_HELP)
@database_options
@click.option("--sql", "print_sql", is_flag=True, help="Print the DDL instead of running it.")
def init_db(database_url: str, table: str, schema: str | None, print_sql: bool) -> None:
    """Create the outbox tables, indexes and triggers, or upgrade an outbox made by an
    earlier version in place.

    Idempotent: creates only what is missing, and says what it changed. With --sql, prints
    the DDL for teams that apply migrations themselves (on PostgreSQL it upgrades in place
    too).
    """
    with open_admin(database_url, table, schema, "init-db") as admin:
        if print_sql:
            for statement in admin.outbox.ddl_statements(admin.engine.dialect):
                click.echo(f"{statement};\n")
            return
        report = admin.create_tables()
    for change in report.changes:
        click.echo(change)
    click.echo(f"outbox tables ready: {admin.outbox.qualified_name} ({mask_url(database_url)})")


@click.command(epilog=EXIT_CODES_HELP)
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
