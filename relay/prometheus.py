"""Prometheus metrics for the relay, on a registry of its own.

Counters and histograms are fed by the relay loop's `Metrics` hooks (cheap, in memory). The
outbox gauges (pending, dead, age of the oldest pending event) come from the database, read
by a collector when Prometheus scrapes, at most once per `refresh_every` seconds (one query,
see `Admin.gauges`): never on the relay's hot path, and a scrape storm costs one query per
interval. If the database does not answer, the last known values are served.

Exported (all prefixed `outbox_relay_`):
  events_published_total{event_type}        counter  confirmed by the broker
  events_failed_total{event_type}           counter  publish attempts rejected
  events_dead_lettered_total{event_type}    counter  events that ran out of attempts
  events_claimed_total                      counter  events leased by claims
  lease_lost_total                          counter  results fenced off (another relay owns them)
  publish_seconds                           histogram publish to broker confirm
  commit_to_confirm_seconds                 histogram event written to broker confirm
  broker_up, database_up                    gauge    1 or 0
  broker_node{node}                         gauge    1 for the node (host:port) connected to
  pending_events, dead_events               gauge    from the database
  oldest_pending_age_seconds                gauge    from the database (0 when none pending)
  held_keys                                 gauge    from the database: keys a dead letter holds
  active_relays                             gauge    from the database: relays with a recent
                                                     heartbeat (every relay of the outbox)

The dashboard and alert rules in deploy/ use these names; tests/unit/test_deploy.py fails if
one of them names a metric that is not exported here.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from relay.admin_records import OutboxGauges
from relay.metrics import Metrics

log = logging.getLogger("relay.prometheus")

PREFIX = "outbox_relay"
REFRESH_EVERY = 15.0
"""Seconds between two database reads for the outbox gauges, at the least."""

PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COMMIT_TO_CONFIRM_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
)

GaugeSource = Callable[[], OutboxGauges]


@dataclasses.dataclass(frozen=True, slots=True)
class MetricsServer:
    port: int
    stop: Callable[[], None]


class OutboxCollector:
    """Serves the database gauges, refreshed lazily and at most every `refresh_every` s."""

    def __init__(
        self,
        source: GaugeSource | None = None,
        *,
        refresh_every: float = REFRESH_EVERY,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.refresh_every = refresh_every
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._values: OutboxGauges | None = None
        self._next_refresh: float | None = None
        self._failing = False

    def describe(self) -> Iterable[Any]:
        # Names only: registering must not query the database.
        return self._families(None)

    def collect(self) -> Iterable[Any]:
        return self._families(self._current())

    def _current(self) -> OutboxGauges | None:
        with self._lock:
            now = self._monotonic()
            if self.source is None or (self._next_refresh is not None and now < self._next_refresh):
                return self._values
            self._next_refresh = now + self.refresh_every
            try:
                self._values = self.source()
                if self._failing:
                    log.info("outbox gauges: database answers again")
                self._failing = False
            except Exception as exc:
                if not self._failing:
                    log.warning(
                        "outbox gauges: keeping the last values, database read failed: %s", exc
                    )
                self._failing = True
            return self._values

    @staticmethod
    def _families(values: OutboxGauges | None) -> list[GaugeMetricFamily]:
        families = [
            GaugeMetricFamily(
                f"{PREFIX}_pending_events", "Events waiting to be published (incl. in flight)."
            ),
            GaugeMetricFamily(f"{PREFIX}_dead_events", "Dead letters waiting for an operator."),
            GaugeMetricFamily(
                f"{PREFIX}_oldest_pending_age_seconds",
                "Age of the oldest pending event (0 when none is pending).",
            ),
            GaugeMetricFamily(
                f"{PREFIX}_held_keys",
                "Keys held by a dead letter: their later events wait until it is requeued or "
                "purged.",
            ),
            GaugeMetricFamily(
                f"{PREFIX}_active_relays",
                "Relays of this outbox with a recent heartbeat (as listed by status).",
            ),
        ]
        if values is not None:
            families[0].add_metric([], values.pending)
            families[1].add_metric([], values.dead)
            families[2].add_metric([], values.oldest_pending_age or 0.0)
            families[3].add_metric([], values.held_keys)
            families[4].add_metric([], values.active_relays)
        return families


class PrometheusMetrics(Metrics):
    """`relay.metrics.Metrics` exported to Prometheus, on its own `CollectorRegistry`."""

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        outbox_gauges: GaugeSource | None = None,
        refresh_every: float = REFRESH_EVERY,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events_published = Counter(
            f"{PREFIX}_events_published",
            "Events confirmed by the broker.",
            ["event_type"],
            registry=r,
        )
        self.events_failed = Counter(
            f"{PREFIX}_events_failed",
            "Publish attempts rejected by the broker (nack, unroutable, channel error).",
            ["event_type"],
            registry=r,
        )
        self.events_dead_lettered = Counter(
            f"{PREFIX}_events_dead_lettered",
            "Events that ran out of attempts and became dead letters.",
            ["event_type"],
            registry=r,
        )
        self.events_claimed = Counter(
            f"{PREFIX}_events_claimed", "Events leased by this relay's claims.", registry=r
        )
        self.leases_lost = Counter(
            f"{PREFIX}_lease_lost",
            "Results not recorded because another relay had taken the lease over.",
            registry=r,
        )
        self.publish_seconds = Histogram(
            f"{PREFIX}_publish_seconds",
            "Time from publish to the broker's confirm.",
            buckets=PUBLISH_BUCKETS,
            registry=r,
        )
        self.commit_to_confirm_seconds = Histogram(
            f"{PREFIX}_commit_to_confirm_seconds",
            "Time from the event's write (occurred_at) to the broker's confirm.",
            buckets=COMMIT_TO_CONFIRM_BUCKETS,
            registry=r,
        )
        self.broker = Gauge(f"{PREFIX}_broker_up", "1 while connected to RabbitMQ.", registry=r)
        self.broker_nodes = Gauge(
            f"{PREFIX}_broker_node",
            "1 for the RabbitMQ node (host:port) the relay is connected to, 0 for nodes it "
            "was connected to before.",
            ["node"],
            registry=r,
        )
        self._broker_nodes_seen: set[str] = set()
        self.database = Gauge(
            f"{PREFIX}_database_up", "0 while the database does not answer.", registry=r
        )
        self.database.set(1)
        self.outbox = OutboxCollector(
            outbox_gauges, refresh_every=refresh_every, monotonic=monotonic
        )
        r.register(self.outbox)

    def watch_outbox(self, source: GaugeSource) -> None:
        """Serve the outbox gauges from `source` (e.g. `Admin(engine, outbox).gauges`)."""
        self.outbox.source = source

    def serve(self, port: int, address: str = "127.0.0.1") -> MetricsServer:
        """Serve /metrics over HTTP from a daemon thread (port 0: any free port)."""
        server, thread = start_http_server(port, addr=address, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(5)

        return MetricsServer(port=int(server.server_port), stop=stop)

    # -- Metrics hooks ----------------------------------------------------------------------

    def claimed(self, count: int) -> None:
        self.events_claimed.inc(count)

    def published(
        self, event_type: str, commit_to_confirm: float, publish_to_confirm: float
    ) -> None:
        self.events_published.labels(event_type).inc()
        self.commit_to_confirm_seconds.observe(max(0.0, commit_to_confirm))
        self.publish_seconds.observe(max(0.0, publish_to_confirm))

    def failed(self, event_type: str, *, dead: bool) -> None:
        self.events_failed.labels(event_type).inc()
        if dead:
            self.events_dead_lettered.labels(event_type).inc()

    def lease_lost(self, count: int) -> None:
        self.leases_lost.inc(count)

    def broker_up(self, up: bool) -> None:
        self.broker.set(1 if up else 0)

    def broker_node(self, node: str) -> None:
        for seen in self._broker_nodes_seen - {node}:
            self.broker_nodes.labels(seen).set(0)
        self._broker_nodes_seen.add(node)
        self.broker_nodes.labels(node).set(1)

    def database_up(self, up: bool) -> None:
        self.database.set(1 if up else 0)
