"""Broker plumbing for benchmarks: a private durable queue per run, drained after the run.

The broker is shared, so every queue and exchange has a unique name and is deleted on exit,
whatever happened. No connection is held open across a measured run: a `BlockingConnection`
left idle during a minute-long relay run misses its heartbeats and the broker drops it, and a
tap that lost its connection might fail to delete its queue. Each step opens its own
short-lived connection instead.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from types import TracebackType

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.exchange_type import ExchangeType
from pika.spec import Basic, BasicProperties

from tests.support.history import Delivery
from tests.support.rabbit import delivery_from_message, unique_name

log = logging.getLogger("bench.broker")

_PREFETCH = 2000
_ACK_EVERY = 500


def open_connection(amqp_url: str, name: str) -> pika.BlockingConnection:
    params = pika.URLParameters(amqp_url)
    params.client_properties = {"connection_name": name}
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.blocked_connection_timeout = 60
    return pika.BlockingConnection(params)


class BenchQueue:
    """A durable topic exchange and a durable classic queue bound to it with "#".

    The same kind of queue the relay's consumers would use; the relay and the baselines each
    publish into one of their own, so a run never sees another run's messages.
    """

    def __init__(self, amqp_url: str, prefix: str) -> None:
        self.amqp_url = amqp_url
        self.queue = unique_name(f"{prefix}-q")
        self.exchange = unique_name(f"{prefix}-ex")

    def __enter__(self) -> BenchQueue:
        connection = open_connection(self.amqp_url, f"{self.queue}-setup")
        try:
            channel = connection.channel()
            topic = ExchangeType("topic")
            channel.exchange_declare(self.exchange, exchange_type=topic, durable=True)
            channel.queue_declare(self.queue, durable=True)
            channel.queue_bind(self.queue, self.exchange, routing_key="#")
        except BaseException:
            connection.close()
            self.delete()
            raise
        connection.close()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.delete()

    def delete(self) -> None:
        """Delete the queue and the exchange; never raises (logs what it could not delete)."""
        try:
            connection = open_connection(self.amqp_url, f"{self.queue}-cleanup")
        except Exception as exc:
            log.warning("cannot delete queue %s / exchange %s: %s", self.queue, self.exchange, exc)
            return
        try:
            channel = connection.channel()
            channel.queue_delete(self.queue)
            channel.exchange_delete(self.exchange)
        except Exception as exc:
            log.warning(
                "deleting queue %s / exchange %s failed: %s", self.queue, self.exchange, exc
            )
        finally:
            with contextlib.suppress(Exception):
                connection.close()

    def message_count(self) -> int:
        """Messages ready in the queue (a passive declare)."""
        connection = open_connection(self.amqp_url, f"{self.queue}-count")
        try:
            declared = connection.channel().queue_declare(self.queue, passive=True)
            return int(declared.method.message_count or 0)
        finally:
            connection.close()

    def drain(
        self, expected: int, idle_timeout: float, settle: float = 0.3
    ) -> tuple[list[Delivery], list[int]]:
        """Consume until `expected` messages arrived, then `settle` seconds more (an extra
        message, a duplicate, is still seen), or until nothing arrives for `idle_timeout`.
        Returns the deliveries in arrival order and their body sizes."""
        deliveries: list[Delivery] = []
        sizes: list[int] = []
        connection = open_connection(self.amqp_url, f"{self.queue}-drain")
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=_PREFETCH)
            last_tag = 0
            unacked = 0

            def on_message(
                ch: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
            ) -> None:
                nonlocal last_tag, unacked
                deliveries.append(delivery_from_message(method, props))
                sizes.append(len(body))
                last_tag = int(method.delivery_tag or 0)
                unacked += 1
                if unacked >= _ACK_EVERY:
                    ch.basic_ack(last_tag, multiple=True)
                    unacked = 0

            channel.basic_consume(self.queue, on_message)
            idle_deadline = time.monotonic() + idle_timeout
            settle_deadline: float | None = None
            while True:
                before = len(deliveries)
                # types-pika declares time_limit as int; pika takes any number.
                connection.process_data_events(time_limit=0.05)  # type: ignore[arg-type]
                if unacked:
                    channel.basic_ack(last_tag, multiple=True)
                    unacked = 0
                now = time.monotonic()
                if len(deliveries) >= expected:
                    settle_deadline = settle_deadline or now + settle
                    if now >= settle_deadline:
                        break
                elif len(deliveries) > before:
                    idle_deadline = now + idle_timeout
                elif now >= idle_deadline:
                    break
        finally:
            with contextlib.suppress(Exception):
                connection.close()
        return deliveries, sizes


@contextlib.contextmanager
def watch_blocked(logger_name: str = "relay.publisher") -> Iterator[list[str]]:
    """Collect the relay publisher's "broker blocked publishing" warnings during the block:
    another user of the shared broker set off a resource alarm, and the run is disturbed."""
    seen: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "blocked publishing" in record.getMessage():
                seen.append(record.getMessage())

    handler = _Handler(level=logging.WARNING)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
