"""A relay built and served as `outbox-relay run --metrics-port` builds it, on the real
PostgreSQL and RabbitMQ, scraped over HTTP: the gauges operators alert on (dead letters, held
keys, live relays) say what happened, every metric and label the dashboard and the alert
rules in deploy/ name is among what it serves (with the consumer's registry), and its JSON
log lines about the dead event carry the event."""

from __future__ import annotations

import time
import urllib.request

import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from outbox import Event, Outbox
from relay.admin import Admin
from relay.app import build_relay
from relay.prometheus import PrometheusMetrics
from relay.settings import RelaySettings
from tests.faults.runners import RelayThread
from tests.support import promql
from tests.support.logs import assert_carries_event, json_log
from tests.support.rabbit import QueueTap, unique_name
from tests.support.relays import count_by_status, write_events


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_a_served_relay_exports_what_the_dashboard_and_alerts_ask_for(
    pg_engine: sa.Engine, pg_url: str, amqp_url: str, outbox_schema: Outbox
) -> None:
    routed = Event(type="order.placed", key="order:1")
    unroutable = Event(type="invoice.created", key="invoice:1")
    with QueueTap(amqp_url) as tap:
        # Given: a queue for order events only, and a relay serving its metrics.
        exchange = tap.declare_exchange(unique_name("ex"))
        tap.bind(exchange, "order.#")
        settings = RelaySettings(
            database_url=pg_url,
            amqp_url=amqp_url,
            schema=outbox_schema.schema,
            exchange=exchange,
            name=unique_name("metrics"),
            max_attempts=2,
            retry_min=0.05,
            retry_max=0.1,
            poll_interval=0.1,
        )
        metrics = PrometheusMetrics()
        relay = build_relay(settings, metrics=metrics)
        relay.store.check()
        metrics.watch_outbox(Admin(relay.store.engine, relay.store.outbox).gauges)
        server = metrics.serve(0, "127.0.0.1")
        try:
            with json_log() as log, RelayThread(settings, relay=relay) as running:
                # When: a routable and an unroutable event are committed.
                write_events(pg_engine, outbox_schema, [routed, unroutable])
                assert [d.message_id for d in tap.drain(expected=1, timeout=15)] == [str(routed.id)]
                deadline = time.monotonic() + 15
                while count_by_status(pg_engine, outbox_schema).get("dead") != 1:
                    assert time.monotonic() < deadline, count_by_status(pg_engine, outbox_schema)
                    time.sleep(0.05)
                body = scrape(server.port)
                running.assert_running()
        finally:
            server.stop()

    # Then: the gauges tell the dead letter, the key it holds and the live relay.
    families = list(text_string_to_metric_families(body))
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples
    }
    p = "outbox_relay_"
    assert values[(p + "dead_events", ())] == 1
    assert values[(p + "held_keys", ())] == 1
    assert values[(p + "active_relays", ())] == 1
    assert values[(p + "pending_events", ())] == 0
    assert values[(p + "events_published_total", (("event_type", "order.placed"),))] == 1
    dead_lettered = (p + "events_dead_lettered_total", (("event_type", "invoice.created"),))
    assert values[dead_lettered] == 1
    assert values[(p + "broker_up", ())] == 1

    # And: every name of the dashboard and the alert rules is served (or the consumer's).
    series = {**promql.exported(families), **promql.exported(promql.consumer_families())}
    assert promql.everything_wrong(series) == []

    # And: the relay's JSON lines about the unroutable event name it.
    about = log.about(unroutable.id)
    assert [e["attempt"] for e in about] == [1, 2], [e["message"] for e in about]
    for entry in about:
        assert_carries_event(entry, unroutable.id, "invoice.created", "invoice:1")
