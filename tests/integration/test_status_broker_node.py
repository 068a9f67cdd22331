"""`outbox-relay status` says which broker node each relay is connected to."""

from __future__ import annotations

import time

import sqlalchemy as sa

from outbox import Outbox
from relay.admin import Admin
from relay.settings import RelaySettings
from tests.support.rabbit import QueueTap, unique_name
from tests.support.relays import relay_thread


def test_status_shows_the_node_of_each_relay(
    pg_url: str, pg_engine: sa.Engine, amqp_url: str, outbox_schema: Outbox
) -> None:
    with QueueTap(amqp_url) as tap:
        exchange = tap.declare_exchange(unique_name("ex"))
        settings = RelaySettings(
            database_url=pg_url,
            amqp_url=amqp_url,
            schema=outbox_schema.schema,
            exchange=exchange,
            name=unique_name("relay"),
        )
        admin = Admin(pg_engine, outbox_schema)
        with relay_thread(settings):
            deadline = time.monotonic() + 15
            nodes: list[str | None] = []
            while time.monotonic() < deadline:
                nodes = [r.broker_node for r in admin.status().relays if r.name == settings.name]
                if nodes and nodes[0] is not None:
                    break
                time.sleep(0.05)  # polling the heartbeat table: nothing to wait on
    assert nodes == ["127.0.0.1:5672"]
