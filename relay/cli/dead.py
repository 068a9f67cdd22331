"""`outbox-relay dead`: list, show, requeue and purge dead letters."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import TYPE_CHECKING

import click

from relay.cli.database import open_admin
from relay.cli.exits import EXIT_CODES_HELP, OutboxGroup
from relay.cli.options import EVENT_ID, SINCE, database_options, json_option, selector_options
from relay.cli.render import emit_json, plural, render_dead_letters, render_event
from relay.cli.terminal import confirm, progress_bar

if TYPE_CHECKING:
    from relay.admin import Admin
    from relay.admin_records import Plan, Selector

SHOWN_IN_DRY_RUN = 20

_DEAD_LETTER_JSON = """\b
--json prints a list of objects, in write order:
  {"id": str, "seq": int, "type": str, "key": str or null, "routing_key": str,
   "attempts": int, "last_error": str or null, "occurred_at": ISO time,
   "last_failed_at": ISO time or null}
"""


@click.group(cls=OutboxGroup, epilog=EXIT_CODES_HELP)
def dead() -> None:
    """Dead letters: events that ran out of publish attempts.

    \b
    A dead event holds back the later events of its key (unless the relay runs with
    --dead-letters-skip) until it is requeued or purged:
      outbox-relay dead list                     what is dead, and why
      outbox-relay dead show ID                  one in full, with its error history
      outbox-relay dead requeue ID... | --all    publish again (same id, same place in order)
      outbox-relay dead purge ID... | --all      delete, with the error history
    """


@dead.command("list", epilog=_DEAD_LETTER_JSON + "\n\n" + EXIT_CODES_HELP)
@database_options
@json_option
@click.option("--type", "type_", default=None, help="Only dead letters of this type.")
@click.option("--key", default=None, help="Only dead letters of this ordering key.")
@click.option(
    "--since",
    type=SINCE,
    default=None,
    help="Only dead letters whose last failure is this recent: a duration back from now (2h) "
    "or an ISO 8601 time.",
)
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Show at most this many.",
)
def dead_list(
    database_url: str,
    table: str,
    schema: str | None,
    as_json: bool,
    type_: str | None,
    key: str | None,
    since: dt.datetime | None,
    limit: int,
) -> None:
    """List dead letters in write order, with their attempts and last error."""
    from relay.admin_records import Selector

    selector = Selector.filters(type=type_, key=key, since=since)
    with open_admin(database_url, table, schema, "dead-list") as admin:
        letters = admin.dead_letters(selector, limit=limit)
        total = (
            len(letters)
            if len(letters) < limit
            else admin.plan(selector or Selector(everything=True)).count
        )
    if as_json:
        emit_json([letter.to_json() for letter in letters])
        return
    if not letters:
        click.echo("no dead letters" + (" match" if selector else ""))
        return
    for line in render_dead_letters(letters):
        click.echo(line)
    if total > len(letters):
        click.echo(f"\nshowing {len(letters)} of {total} dead letters: use --limit to see more")


@dead.command(
    "show",
    epilog="""\b
--json prints the whole outbox row as one object (every column; "payload" and "headers"
decoded from JSON) plus "failures": [{"attempt", "failed_at", "relay", "error"}], oldest first.

"""
    + EXIT_CODES_HELP,
)
@database_options
@json_option
@click.argument("event_id", type=EVENT_ID)
def dead_show(
    database_url: str, table: str, schema: str | None, as_json: bool, event_id: uuid.UUID
) -> None:
    """Show one event in full: payload, headers and its error history.

    Usually a dead letter, but any event can be shown (its status says where it is).
    """
    with open_admin(database_url, table, schema, "dead-show") as admin:
        detail = admin.event(event_id)
    if as_json:
        emit_json(detail.to_json())
        return
    for line in render_event(detail):
        click.echo(line)


@dead.command("requeue", epilog=EXIT_CODES_HELP)
@database_options
@selector_options
@click.option("--dry-run", is_flag=True, help="Show what would be requeued; change nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before requeueing several.")
def dead_requeue(
    database_url: str,
    table: str,
    schema: str | None,
    ids: tuple[uuid.UUID, ...],
    everything: bool,
    type_: str | None,
    key: str | None,
    since: dt.datetime | None,
    dry_run: bool,
    yes: bool,
) -> None:
    """Publish dead letters again, by id or by selection.

    Select with event ids, or --all, or any of --type T, --key K, --since TIME (combined
    with AND). Each goes back to pending with the same event id (so consumers deduplicate
    it) and the same place in its key's order, attempts 0 and no lease; the relay then
    publishes it before the later events of its key.

    Asks before touching more than one event unless --yes. Named ids are all or nothing: an
    id that does not exist or is not dead changes nothing (exit 1). Selections work in
    batches of 1,000 rows per transaction, with a progress bar on a terminal.
    """
    selector = make_selector(ids, everything, type_, key, since)
    with open_admin(database_url, table, schema, "dead-requeue") as admin:
        plan = admin.plan(selector)
        if not preflight(admin, plan, "requeue", dry_run):
            return
        if plan.count > 1 and not yes:
            confirm(
                f"Requeue {plan_size(plan)}? They will be published again, "
                "in their original order per key."
            )
        with progress_bar(plan.count, "requeueing", admin.batch_size) as progress:
            done = admin.requeue(plan, progress)
    click.echo(
        f"requeued {plan_size(plan, done)}: pending again with their original ids and order, "
        "attempts reset to 0"
    )


@dead.command("purge", epilog=EXIT_CODES_HELP)
@database_options
@selector_options
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; change nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before deleting several.")
def dead_purge(
    database_url: str,
    table: str,
    schema: str | None,
    ids: tuple[uuid.UUID, ...],
    everything: bool,
    type_: str | None,
    key: str | None,
    since: dt.datetime | None,
    dry_run: bool,
    yes: bool,
) -> None:
    """Delete dead letters and their error history.

    Select with event ids, or --all, or any of --type T, --key K, --since TIME (combined
    with AND). They are never published; the later events of their keys are then no longer
    held back. Asks before deleting more than one event unless --yes. Named ids are all or
    nothing (exit 1 if one does not exist or is not dead). Works in batches of 1,000 rows per
    transaction.
    """
    selector = make_selector(ids, everything, type_, key, since)
    with open_admin(database_url, table, schema, "dead-purge") as admin:
        plan = admin.plan(selector)
        if not preflight(admin, plan, "delete", dry_run):
            return
        if plan.count > 1 and not yes:
            confirm(f"Delete {plan_size(plan)} and their failure history? This cannot be undone.")
        with progress_bar(plan.count, "deleting", admin.batch_size) as progress:
            done = admin.purge_dead(plan, progress)
    click.echo(f"deleted {plan_size(plan, done)} and their failure history")


def plan_size(plan: Plan, count: int | None = None) -> str:
    count = plan.count if count is None else count
    return f"{plural(count, 'dead letter')} ({plural(plan.keys, 'key')})"


def preflight(admin: Admin, plan: Plan, verb: str, dry_run: bool) -> bool:
    """Say when nothing matches; for a dry run show what would change. True: go ahead."""
    if plan.count == 0:
        click.echo(f"no dead letters match ({plan.selector.describe()}): nothing to {verb}")
        return False
    if not dry_run:
        return True
    click.echo(f"dry run: would {verb} {plan_size(plan)}, in write order:")
    shown = admin.dead_letters(plan.selector, limit=SHOWN_IN_DRY_RUN)
    for line in render_dead_letters(shown):
        click.echo("  " + line)
    if plan.count > len(shown):
        click.echo(f"  ... and {plan.count - len(shown)} more")
    click.echo("nothing was changed")
    return False


def make_selector(
    ids: tuple[uuid.UUID, ...],
    everything: bool,
    type_: str | None,
    key: str | None,
    since: dt.datetime | None,
) -> Selector:
    from relay.admin_records import Selector

    return Selector(ids=ids, everything=everything, type=type_, key=key, since=since)
