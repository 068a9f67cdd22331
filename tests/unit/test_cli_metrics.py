"""PrometheusMetrics (served by `outbox-relay run --metrics-port`): hooks, the database gauges'
refresh limit, and the HTTP endpoint."""

from __future__ import annotations

import urllib.request

import pytest

from relay.admin_records import OutboxGauges
from relay.prometheus import PrometheusMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Source:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False
        self.values = OutboxGauges(
            pending=3, dead=1, oldest_pending_age=12.5, held_keys=2, active_relays=1
        )

    def __call__(self) -> OutboxGauges:
        self.calls += 1
        if self.fail:
            raise RuntimeError("database down")
        return self.values


def sample(metrics: PrometheusMetrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


def test_hooks_feed_counters_and_histograms() -> None:
    metrics = PrometheusMetrics()
    metrics.claimed(5)
    metrics.published("order.placed", commit_to_confirm=0.2, publish_to_confirm=0.004)
    metrics.published("order.placed", commit_to_confirm=0.3, publish_to_confirm=0.006)
    metrics.failed("invoice.created", dead=False)
    metrics.failed("invoice.created", dead=True)
    metrics.lease_lost(2)
    metrics.broker_up(True)
    metrics.database_up(False)

    p = "outbox_relay_"
    assert sample(metrics, p + "events_claimed_total") == 5
    assert sample(metrics, p + "events_published_total", event_type="order.placed") == 2
    assert sample(metrics, p + "events_failed_total", event_type="invoice.created") == 2
    assert sample(metrics, p + "events_dead_lettered_total", event_type="invoice.created") == 1
    assert sample(metrics, p + "lease_lost_total") == 2
    assert sample(metrics, p + "publish_seconds_count") == 2
    assert sample(metrics, p + "publish_seconds_bucket", le="0.005") == 1
    assert sample(metrics, p + "commit_to_confirm_seconds_sum") == pytest.approx(0.5)
    assert sample(metrics, p + "broker_up") == 1
    assert sample(metrics, p + "database_up") == 0


def test_each_instance_has_its_own_registry() -> None:
    first, second = PrometheusMetrics(), PrometheusMetrics()
    first.claimed(1)
    assert sample(second, "outbox_relay_events_claimed_total") == 0


def test_database_gauges_are_read_at_most_every_15_seconds() -> None:
    clock, source = Clock(), Source()
    metrics = PrometheusMetrics(outbox_gauges=source, monotonic=clock)
    assert source.calls == 0  # registering does not query
    assert sample(metrics, "outbox_relay_pending_events") == 3
    assert sample(metrics, "outbox_relay_dead_events") == 1
    assert sample(metrics, "outbox_relay_oldest_pending_age_seconds") == 12.5
    assert sample(metrics, "outbox_relay_held_keys") == 2
    assert sample(metrics, "outbox_relay_active_relays") == 1
    assert source.calls == 1  # one read serves every gauge and the next scrapes
    calls = source.calls
    source.values = OutboxGauges(
        pending=0, dead=0, oldest_pending_age=None, held_keys=0, active_relays=0
    )
    clock.now += 14.9
    assert sample(metrics, "outbox_relay_pending_events") == 3
    assert source.calls == calls
    clock.now += 0.2
    assert sample(metrics, "outbox_relay_pending_events") == 0
    assert sample(metrics, "outbox_relay_oldest_pending_age_seconds") == 0
    assert sample(metrics, "outbox_relay_active_relays") == 0
    assert source.calls == calls + 1


def test_a_failing_database_keeps_the_last_values() -> None:
    clock, source = Clock(), Source()
    metrics = PrometheusMetrics(outbox_gauges=source, monotonic=clock)
    assert sample(metrics, "outbox_relay_dead_events") == 1
    source.fail = True
    clock.now += 20
    assert sample(metrics, "outbox_relay_dead_events") == 1
    calls = source.calls
    assert sample(metrics, "outbox_relay_dead_events") == 1
    assert source.calls == calls  # a down database is not hammered either


def test_without_a_source_the_gauges_are_absent_until_watched() -> None:
    metrics = PrometheusMetrics()
    assert sample(metrics, "outbox_relay_pending_events") is None
    metrics.watch_outbox(Source())
    assert sample(metrics, "outbox_relay_pending_events") == 3


def test_serves_the_text_format_over_http() -> None:
    metrics = PrometheusMetrics(outbox_gauges=Source())
    metrics.failed("invoice.created", dead=True)
    server = metrics.serve(0, "127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
    finally:
        server.stop()
    assert 'outbox_relay_events_dead_lettered_total{event_type="invoice.created"} 1.0' in body
    assert "outbox_relay_pending_events 3.0" in body
