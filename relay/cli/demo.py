"""`outbox-relay demo`: the whole loop on the local services."""

from __future__ import annotations

import click

from relay.cli.exits import EXIT_CODES_HELP, EXIT_ERROR, META_DATABASE_URL, fail
from relay.cli.options import amqp_option, checked_url
from relay.urls import mask_url

DEFAULT_DATABASE_URL = "postgresql+psycopg://root@127.0.0.1:5432/outbox_demo"
"""The same as relay.demo's (not imported: it needs pika and psycopg before --help)."""


@click.command(epilog=EXIT_CODES_HELP)
@click.option(
    "--database-url",
    # Not OUTBOX_DATABASE_URL: a shell pointed at a real database must not run the demo there.
    envvar="OUTBOX_DEMO_DATABASE_URL",
    show_envvar=True,
    default=DEFAULT_DATABASE_URL,
    show_default=True,
    callback=checked_url(META_DATABASE_URL),
    help="PostgreSQL database of the demo's own (created if missing).",
)
@amqp_option(default="amqp://guest:guest@127.0.0.1:5672/%2F")
@click.option(
    "--schema",
    default="outbox_demo",
    show_default=True,
    help="Schema the demo drops and creates afresh (refused if it holds other tables).",
)
@click.option(
    "--orders", default=5, show_default=True, type=click.IntRange(1, 200), help="Orders to place."
)
def demo(database_url: str, amqp_url: str, schema: str, orders: int) -> None:
    """Run the whole loop on the local services and show what arrived and was applied.

    A sample application (an ORM aggregate Order with outbox.install) places, pays and ships
    a few orders, one transaction each, and rolls one transaction back; the relay publishes
    the outbox to a fresh exchange; a queue bound to it receives the events. A consumer group
    (stock and email handlers, the inbox in the demo's schema) consumes them through the
    consumer runner, and one message is published again to show it skipped as a duplicate.
    Exit 0 only if every committed event arrived and was applied once, in order per key, the
    rolled-back one did neither, and the duplicate was not applied twice.
    """
    from relay.demo import render, run_demo

    report = run_demo(
        database_url=database_url,
        amqp_url=amqp_url,
        schema=schema,
        orders=orders,
        say=click.echo,
    )
    for line in render(report):
        click.echo(line)
    if not report.ok:
        fail(
            EXIT_ERROR,
            "the demo did not deliver and apply every committed event once, in order (see above)",
        )
    click.echo(
        f"\ninspect it: outbox-relay status --database-url {mask_url(database_url)} "
        f"--schema {schema}"
    )
