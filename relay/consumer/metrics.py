"""Prometheus metrics of the consumer: outcomes, handler latency, parked keys, queue depth."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from outbox.consumer import Message, Result

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ConsumerMetrics:
    """Metrics on a registry of their own (no global state), served with `serve()`."""

    def __init__(self, consumer: str, registry: CollectorRegistry | None = None) -> None:
        self.consumer = consumer
        self.registry = registry or CollectorRegistry()
        self.messages = Counter(
            "outbox_consumer_messages",
            "Messages by outcome: handled, ignored, duplicate, stale, parked, superseded.",
            ["consumer", "type", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "outbox_consumer_handle_seconds",
            "Time from receiving a message to its commit (handlers, inbox, retries).",
            ["consumer", "type"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.parked_messages = Gauge(
            "outbox_consumer_parked_messages",
            "Messages in the parked table.",
            ["consumer"],
            registry=self.registry,
        )
        self.parked_keys = Gauge(
            "outbox_consumer_parked_keys",
            "Keys held back by a parked message.",
            ["consumer"],
            registry=self.registry,
        )
        self.depth = Gauge(
            "outbox_consumer_queue_messages",
            "Messages ready in each queue of the group (consumer lag).",
            ["consumer", "queue"],
            registry=self.registry,
        )
        self.outages = Counter(
            "outbox_consumer_outages",
            "Reconnects after a broker or database outage.",
            ["consumer", "error"],
            registry=self.registry,
        )

    def result(self, message: Message, result: Result, seconds: float) -> None:
        self.messages.labels(self.consumer, message.type, result.outcome.value).inc()
        self.latency.labels(self.consumer, message.type).observe(seconds)

    def parked(self, messages: int, keys: int) -> None:
        self.parked_messages.labels(self.consumer).set(messages)
        self.parked_keys.labels(self.consumer).set(keys)

    def queue_depth(self, queue: str, count: int) -> None:
        self.depth.labels(self.consumer, queue).set(count)

    def outage(self, error: str) -> None:
        self.outages.labels(self.consumer, error).inc()

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        start_http_server(port, addr=address, registry=self.registry)
