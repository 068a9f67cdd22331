"""`outbox-relay inbox`: create the inbox tables; list, show, retry and skip parked messages."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import click

from relay.cli.exits import (
    EXIT_CODES_HELP,
    EXIT_ERROR,
    OutboxGroup,
    exit_code_for,
)
from relay.cli.options import amqp_option, database_url_option, json_option
from relay.cli.render import LAST_ERROR_WIDTH, emit_json, format_table, format_time, plural, shorten
from relay.cli.terminal import confirm
from relay.errors import ConfigError, NotFoundError
from relay.urls import mask_url

# Parked ids are bigint: a larger number is a usage error, not a database error.
PARKED_ID = click.IntRange(1, 2**63 - 1)

if TYPE_CHECKING:
    from outbox.consumer import ParkedMessage
    from outbox.consumer.admin import ParkedAdmin

F = TypeVar("F", bound=Callable[..., Any])
SHOWN_IN_DRY_RUN = 20

_PARKED_JSON = """\b
--json prints a list of objects, in arrival order:
  {"id": int, "message_id": str, "key": str or null, "seq": int or null, "type": str,
   "version": int, "reason": "failed" | "undecodable" | "behind" | "stale",
   "attempts": int, "parked_at": ISO time, "retry_requested": bool, "error": str or null}
"""


_database_url = database_url_option("SQLAlchemy URL of the database that holds the inbox tables.")


def inbox_options(f: F) -> F:
    f = click.option(
        "--inbox-table",
        envvar="OUTBOX_INBOX_TABLE",
        show_envvar=True,
        default="inbox",
        show_default=True,
        help="Name of the inbox table (the others are <name>_keys and <name>_parked).",
    )(f)
    f = click.option(
        "--schema",
        envvar="OUTBOX_INBOX_SCHEMA",
        show_envvar=True,
        default=None,
        help="Database schema of the inbox tables (default: the connection's search path).",
    )(f)
    f = click.option(
        "--consumer",
        envvar="OUTBOX_CONSUMER_GROUP",
        show_envvar=True,
        required=True,
        help="The consumer group: the name given to Handlers(name, ...).",
    )(f)
    return _database_url(f)


@contextlib.contextmanager
def open_parked(
    database_url: str, consumer: str, schema: str | None, inbox_table: str
) -> Iterator[ParkedAdmin]:
    from outbox.consumer import Inbox
    from outbox.consumer.admin import ParkedAdmin
    from relay.consumer.app import check_tables, create_engine

    engine = create_engine(database_url, application_name=f"outbox-relay:inbox:{consumer}")
    try:
        inbox = Inbox(schema=schema, prefix=inbox_table)
        check_tables(engine, inbox)
        yield ParkedAdmin(engine, inbox, consumer)
    finally:
        engine.dispose()


@contextlib.contextmanager
def not_found_is_exit_1() -> Iterator[None]:
    from outbox.consumer import ParkedMessageNotFoundError

    try:
        yield
    except ParkedMessageNotFoundError as exc:
        raise NotFoundError(str(exc)) from None


@click.group(cls=OutboxGroup, epilog=EXIT_CODES_HELP)
def inbox() -> None:
    """The consumer side's inbox: its tables and its parked messages."""


@inbox.command("init-db", epilog=EXIT_CODES_HELP)
@click.argument("reference", metavar="MODULE:HANDLERS")
@_database_url
@click.option("--sql", "print_sql", is_flag=True, help="Print the DDL instead of running it.")
def init_db(reference: str, database_url: str, print_sql: bool) -> None:
    """Create the inbox tables of MODULE:HANDLERS (where its Inbox puts them). Idempotent."""
    import sqlalchemy as sa

    from relay.consumer.app import create_engine, load_handlers

    handlers = load_handlers(reference)
    engine = create_engine(database_url, application_name="outbox-relay:inbox-init-db")
    try:
        if print_sql:
            for table in handlers.inbox.tables:
                click.echo(f"{sa.schema.CreateTable(table).compile(engine)};")
                for index in table.indexes:
                    click.echo(f"{sa.schema.CreateIndex(index).compile(engine)};\n")
            return
        handlers.inbox.create(engine)
    finally:
        engine.dispose()
    names = ", ".join(t.fullname for t in handlers.inbox.tables)
    click.echo(f"inbox tables ready: {names} ({mask_url(database_url)})")


@inbox.command(
    "health",
    epilog="""\b
--json prints {"ok": bool, "database": {"ok": bool, "detail": str},
               "broker": {"ok": bool, "detail": str}}
"""
    + "\n\n"
    + EXIT_CODES_HELP,
)
@inbox_options
@amqp_option()
@click.option(
    "--queues",
    envvar="OUTBOX_CONSUMER_QUEUES",
    show_envvar=True,
    default=4,
    show_default=True,
    type=click.IntRange(1, 256),
    help="The group's number of queues, as given to `consume`.",
)
@json_option
def inbox_health(
    database_url: str,
    consumer: str,
    schema: str | None,
    inbox_table: str,
    amqp_url: str,
    queues: int,
    as_json: bool,
) -> None:
    """Check a consumer group: its inbox tables, and a consumer on each of its queues.

    Exit 0 only if the database answers with the inbox tables in place and every queue
    <consumer>.0 ... <consumer>.N-1 exists with at least one consumer attached (active or
    standing by); otherwise the exit code of the first failure (1 for a queue without a
    consumer). One line per service.
    """
    from outbox.consumer import Inbox
    from relay.consumer.app import create_engine
    from relay.consumer.health import check_inbox, check_queues

    engine = create_engine(database_url, application_name=f"outbox-relay:health:{consumer}")
    try:
        inbox_tables = Inbox(schema=schema, prefix=inbox_table)
        checks = [
            check_inbox(engine, inbox_tables, database_url),
            check_queues(amqp_url, consumer, queues),
        ]
    finally:
        engine.dispose()
    failed = [c for c in checks if not c.ok]
    if as_json:
        emit_json({"ok": not failed, **{c.service: c.to_json() for c in checks}})
    else:
        for c in checks:
            click.echo(f"{c.service:<8}  {'ok  ' if c.ok else 'FAIL'}  {c.detail}")
    for c in failed:
        sys.exit(exit_code_for(c.error) if c.error is not None else EXIT_ERROR)


@inbox.group(cls=OutboxGroup, epilog=EXIT_CODES_HELP)
def parked() -> None:
    """Messages a consumer set aside, and the keys they hold back.

    \b
    A handler that keeps failing, a payload that does not decode or a version the consumer
    does not know parks its message; the later messages of its key are parked behind it, in
    order, while other keys go on. Stale messages (older than what the key already applied)
    are parked too, without holding the key back.
      outbox-relay inbox parked list                 what is parked, and why
      outbox-relay inbox parked show ID              one in full: payload, headers, error
      outbox-relay inbox parked retry KEY... | --all replay in order (by a running consumer)
      outbox-relay inbox parked skip KEY | --id ID   drop a key's head (or one message)
    """


@parked.command("list", epilog=_PARKED_JSON + "\n\n" + EXIT_CODES_HELP)
@inbox_options
@json_option
@click.option("--key", default=None, help="Only messages of this ordering key.")
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Show at most this many.",
)
def parked_list(
    database_url: str,
    consumer: str,
    schema: str | None,
    inbox_table: str,
    as_json: bool,
    key: str | None,
    limit: int,
) -> None:
    """List parked messages in arrival order, with why they are parked."""
    with open_parked(database_url, consumer, schema, inbox_table) as admin:
        rows = admin.parked(key=key, limit=limit)
        total, keys = admin.counts()
    if as_json:
        emit_json([to_json(row, with_body=False) for row in rows])
        return
    if not rows:
        click.echo(f"no parked messages for consumer {consumer!r}" + (" match" if key else ""))
        return
    for line in render_parked(rows):
        click.echo(line)
    click.echo(f"\n{plural(total, 'parked message')}, {plural(keys, 'key')} held back")
    if total > len(rows) and key is None:
        click.echo(f"showing {len(rows)}: use --limit to see more")


@parked.command("show", epilog=EXIT_CODES_HELP)
@inbox_options
@json_option
@click.argument("parked_id", type=PARKED_ID)
def parked_show(
    database_url: str,
    consumer: str,
    schema: str | None,
    inbox_table: str,
    as_json: bool,
    parked_id: int,
) -> None:
    """Show one parked message in full: payload, headers and the error."""
    with open_parked(database_url, consumer, schema, inbox_table) as admin, not_found_is_exit_1():
        row = admin.show(parked_id)
    data = to_json(row, with_body=True)
    if as_json:
        emit_json(data)
        return
    fields = [(k, data[k]) for k in data if k not in ("payload", "error", "headers")]
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        click.echo(f"{k:<{width}}  {'-' if v is None else v}")
    click.echo(f"{'headers':<{width}}  {json.dumps(data['headers'], ensure_ascii=False)}")
    click.echo("payload:")
    payload = data["payload"]
    text = (
        payload if isinstance(payload, str) else json.dumps(payload, indent=2, ensure_ascii=False)
    )
    click.echo("\n".join("  " + line for line in text.splitlines()))
    click.echo("error:")
    click.echo("\n".join("  " + line for line in (row.error or "-").splitlines()))


@parked.command("retry", epilog=EXIT_CODES_HELP)
@inbox_options
@click.argument("keys", nargs=-1)
@click.option("--id", "ids", multiple=True, type=PARKED_ID, help="A parked message id.")
@click.option("--all", "everything", is_flag=True, help="Every parked message of the consumer.")
@click.option("--dry-run", is_flag=True, help="Show what would be retried; change nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before retrying several.")
def parked_retry(
    database_url: str,
    consumer: str,
    schema: str | None,
    inbox_table: str,
    keys: tuple[str, ...],
    ids: tuple[int, ...],
    everything: bool,
    dry_run: bool,
    yes: bool,
) -> None:
    """Replay the parked messages of KEYs (or --id, --all), in their original order.

    A running `outbox-relay consume` of the group replays them within a second or so: each
    through its handlers again, in a fresh transaction, the key's head first. If the head
    fails again it stays parked with the new error. Once a key has nothing parked left, its
    new messages flow again. A stale message (--id) is applied although the key moved past it.
    Named keys and ids are all or nothing (exit 1 if one is not parked).
    """
    if not (keys or ids or everything):
        raise ConfigError("name what to retry: one or more KEYs, --id ID, or --all")
    if everything and (keys or ids):
        raise ConfigError("--all retries everything: give it without KEYs or --id")
    with open_parked(database_url, consumer, schema, inbox_table) as admin, not_found_is_exit_1():
        rows = admin.plan_retry(keys=keys, ids=ids, everything=everything)
        if not rows:
            click.echo(f"no parked messages for consumer {consumer!r}: nothing to retry")
            return
        count_keys = len({r.message.key for r in rows})
        size = f"{plural(len(rows), 'parked message')} ({plural(count_keys, 'key')})"
        if dry_run:
            click.echo(f"dry run: would retry {size}, in arrival order:")
            for line in render_parked(rows[:SHOWN_IN_DRY_RUN]):
                click.echo("  " + line)
            if len(rows) > SHOWN_IN_DRY_RUN:
                click.echo(f"  ... and {len(rows) - SHOWN_IN_DRY_RUN} more")
            click.echo("nothing was changed")
            return
        if len(rows) > 1 and not yes:
            confirm(f"Retry {size}? Their handlers run again, in order per key.")
        admin.request_retry(rows)
    click.echo(
        f"retry requested for {size}: a running `outbox-relay consume` replays them in order; "
        "`inbox parked list` shows what is left"
    )


@parked.command("skip", epilog=EXIT_CODES_HELP)
@inbox_options
@click.argument("key", required=False)
@click.option("--id", "parked_id", type=PARKED_ID, help="A parked message id instead.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def parked_skip(
    database_url: str,
    consumer: str,
    schema: str | None,
    inbox_table: str,
    key: str | None,
    parked_id: int | None,
    yes: bool,
) -> None:
    """Drop the head of KEY (the message that holds it back), or one message by --id.

    The message is recorded in the inbox as handled without running its handlers, so a
    redelivery is a duplicate. Messages parked behind it stay parked: retry the key next.
    Always asks first unless --yes.
    """
    if (key is None) == (parked_id is None):
        raise ConfigError("name one KEY or one --id to skip")
    with open_parked(database_url, consumer, schema, inbox_table) as admin, not_found_is_exit_1():
        row = admin.head(key) if key is not None else admin.show(parked_id or 0)
        if not yes:
            confirm(
                f"Skip parked message {row.id} ({row.message.type}, key "
                f"{row.message.key or '-'}, seq {row.message.seq})? Its handlers never run."
            )
        skipped = admin.skip(row.id)
    click.echo(f"skipped parked message {row.id} ({row.message.message_id})")
    if skipped.still_parked:
        click.echo(
            f"{plural(skipped.still_parked, 'message')} of key {row.message.key!r} still "
            f"parked: `outbox-relay inbox parked retry {row.message.key}` replays them"
        )


def render_parked(rows: list[ParkedMessage]) -> list[str]:
    return format_table(
        ["ID", "KEY", "SEQ", "TYPE", "V", "REASON", "ATTEMPTS", "PARKED AT", "ERROR"],
        [
            [
                str(r.id),
                r.message.key or "-",
                "-" if r.message.seq is None else str(r.message.seq),
                r.message.type,
                str(r.message.version),
                r.reason + (" (retry requested)" if r.retry_requested else ""),
                str(r.attempts),
                format_time(r.parked_at),
                shorten(_last_line(r.error), LAST_ERROR_WIDTH),
            ]
            for r in rows
        ],
    )


def _last_line(error: str | None) -> str | None:
    """A traceback's last line says what failed."""
    if not error:
        return error
    lines = [line for line in error.strip().splitlines() if line.strip()]
    return lines[-1] if lines else error


def to_json(row: ParkedMessage, *, with_body: bool) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": row.id,
        "message_id": row.message.message_id,
        "key": row.message.key,
        "seq": row.message.seq,
        "type": row.message.type,
        "version": row.message.version,
        "routing_key": row.message.routing_key,
        "reason": row.reason,
        "attempts": row.attempts,
        "parked_at": row.parked_at.isoformat(),
        "retry_requested": row.retry_requested,
        "error": row.error,
    }
    if with_body:
        data["headers"] = dict(row.message.headers)
        try:
            data["payload"] = row.message.payload()
        except Exception:
            data["payload"] = row.message.body.decode("utf-8", "replace")
    return data
