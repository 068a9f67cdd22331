"""`Consumer`: receive a group's messages from RabbitMQ, apply them, ack after the commit.

`run_once()` is the unit of work (tests step it); `run()` repeats it until `request_stop()`,
reconnecting with backoff when the broker or the database goes away. Only the CLI installs
signal handlers.

Why per-key order holds here: every queue has one active consumer (single active consumer)
and a prefetch of 1, so this process holds at most one unacked message per queue. Messages
are applied one at a time, in the order they arrived on this channel, each acked only after
its transaction committed. A prefetch above 1 would keep order while the process lives, but
when it dies the broker returns the whole window and a quorum queue need not give it back in
its original order; with 1 there is nothing to reorder.

A message in hand when the database fails is not acked: closing the channel returns it to the
queue, at its head, and it is delivered again after the reconnect.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from outbox.consumer import InboxUnavailableError, Message, Processor, Result
from relay.consumer.metrics import ConsumerMetrics
from relay.consumer.topology import Topology
from relay.errors import BrokerConfigError, BrokerUnavailableError, ConfigError
from relay.health import open_broker

log = logging.getLogger("relay.consumer")

DEFAULT_HOUSEKEEPING_INTERVAL = 1.0
DEFAULT_CLEANUP_INTERVAL = 60.0
DEFAULT_RETENTION = 7 * 24 * 3600.0
RECONNECT_MIN = 0.5
RECONNECT_MAX = 30.0
_DEPTH_INTERVAL = 15.0

BeforeAck = Callable[[Message, Result], None]


@dataclasses.dataclass(frozen=True)
class ConsumerSettings:
    amqp_url: str
    name: str
    exchange: str = "outbox"
    exchange_type: str = "topic"
    queues: int = 4
    queue_type: str = "quorum"
    retention: float = DEFAULT_RETENTION
    housekeeping_interval: float = DEFAULT_HOUSEKEEPING_INTERVAL
    cleanup_interval: float = DEFAULT_CLEANUP_INTERVAL

    def __post_init__(self) -> None:
        if self.retention <= 0:
            raise ConfigError(f"retention must be more than 0 s, got {self.retention}")
        if self.housekeeping_interval <= 0 or self.cleanup_interval <= 0:
            raise ConfigError("housekeeping and cleanup intervals must be more than 0 s")


@dataclasses.dataclass(frozen=True)
class _Delivery:
    tag: int
    message: Message
    queue: str | None  # names the message's trace span


class Consumer:
    """One broker connection consuming every queue of one consumer group."""

    def __init__(
        self,
        processor: Processor,
        settings: ConsumerSettings,
        *,
        metrics: ConsumerMetrics | None = None,
        before_ack: BeforeAck | None = None,
        clock: Callable[[], float] = time.monotonic,
        queue_indexes: Sequence[int] | None = None,
        housekeeping: bool = True,
    ) -> None:
        """`queue_indexes`: consume only these of the group's queues (all by default), for
        several consumers in threads of one process; `housekeeping`: this one replays
        parked messages on request and cleans up the inbox (one per process is enough)."""
        self.processor = processor
        self.settings = settings
        self.metrics = metrics
        self.before_ack = before_ack
        self.clock = clock
        handlers = processor.handlers
        self.topology = Topology(
            group=handlers.name,
            exchange=settings.exchange,
            routing_keys=handlers.bindings,
            queues=settings.queues,
            queue_type=settings.queue_type,
            source_exchange_type=settings.exchange_type,
        )
        indexes = range(self.topology.queues) if queue_indexes is None else queue_indexes
        if not indexes or any(not 0 <= i < self.topology.queues for i in indexes):
            raise ConfigError(
                f"queue indexes {list(indexes)} must be within 0..{self.topology.queues - 1}"
            )
        self.queues = tuple(self.topology.queue_names[i] for i in sorted(set(indexes)))
        self.housekeeping = housekeeping
        self._stop = threading.Event()
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._buffer: collections.deque[_Delivery] = collections.deque()
        self._queue_of: dict[str, str] = {}  # consumer tag -> queue
        self._next_housekeeping = 0.0
        self._next_cleanup = 0.0
        self._next_depth = 0.0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect, declare the topology and start consuming every queue (manual acks)."""
        self.close()
        connection = open_broker(
            self.settings.amqp_url, connection_name=f"outbox-consumer:{self.settings.name}"
        )
        try:
            channel = connection.channel()
            self.topology.declare(channel)
            channel.basic_qos(prefetch_count=1)
            self._queue_of = {
                channel.basic_consume(queue, self._on_message, auto_ack=False): queue
                for queue in self.queues
            }
        except BrokerConfigError:
            _close_quietly(connection)
            raise
        except (pika.exceptions.AMQPError, OSError) as exc:
            _close_quietly(connection)
            raise BrokerUnavailableError(
                f"broker connection failed while starting: {exc!r}"
            ) from exc
        self._connection, self._channel = connection, channel
        log.info(
            "consumer %s: group %r, queues %s behind %r (routing keys: %s)",
            self.settings.name,
            self.topology.group,
            ", ".join(self.queues),
            self.topology.hash_exchange,
            ", ".join(self.topology.routing_keys),
        )

    def request_stop(self) -> None:
        """Stop after the message in hand (safe from a signal handler or another thread)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        """Disconnect; unacked messages go back to their queues."""
        self._buffer.clear()
        connection, self._connection, self._channel = self._connection, None, None
        _close_quietly(connection)

    # -- the loop --------------------------------------------------------------------------

    def run_once(self, timeout: float = 0.2) -> int:
        """Wait up to `timeout` s for messages, apply and ack what arrived; returns how many.

        Also replays parked messages whose retry was requested and cleans up the inbox when
        due. Raises BrokerUnavailableError or InboxUnavailableError; `run()` handles both.
        """
        if self._connection is None:
            self.start()
        assert self._connection is not None and self._channel is not None
        try:
            if not self._buffer:
                self._connection.process_data_events(time_limit=timeout)  # type: ignore[arg-type]
            done = 0
            while self._buffer and not self._stop.is_set():
                delivery = self._buffer.popleft()
                result = self.processor.process(delivery.message, queue=delivery.queue)
                if self.before_ack is not None:
                    self.before_ack(delivery.message, result)
                self._channel.basic_ack(delivery.tag)
                done += 1
                # Heartbeats and the broker's frames, between two messages.
                self._connection.process_data_events(time_limit=0)
        except (pika.exceptions.AMQPError, OSError) as exc:
            self.close()
            raise BrokerUnavailableError(f"broker connection lost: {exc!r}") from exc
        except InboxUnavailableError:
            self.close()  # the message in hand goes back to its queue
            raise
        self._housekeeping()
        return done

    def run(self) -> None:
        """Consume until `request_stop()`; reconnect with backoff after outages."""
        delay = RECONNECT_MIN
        while not self._stop.is_set():
            try:
                self.run_once()
                delay = RECONNECT_MIN
            except (BrokerUnavailableError, InboxUnavailableError) as exc:
                if self.metrics is not None:
                    self.metrics.outage(type(exc).__name__)
                log.warning(
                    "consumer %s: %s; reconnecting in %.1f s", self.settings.name, exc, delay
                )
                self._stop.wait(delay)
                delay = min(RECONNECT_MAX, delay * 2)
        self.close()
        log.info("consumer %s stopped", self.settings.name)

    # -- internals -------------------------------------------------------------------------

    def _on_message(
        self,
        channel: BlockingChannel,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        message = Message.from_delivery(
            message_id=properties.message_id,
            type=properties.type,
            headers=properties.headers,
            body=body,
            routing_key=method.routing_key,
        )
        assert method.delivery_tag is not None
        queue = self._queue_of.get(method.consumer_tag or "")
        self._buffer.append(_Delivery(tag=method.delivery_tag, message=message, queue=queue))

    def _housekeeping(self) -> None:
        if not self.housekeeping:
            return
        now = self.clock()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + self.settings.housekeeping_interval
            self.processor.retry_requested()
            if self.metrics is not None:
                self.metrics.parked(*self.processor.parked_counts())
        if now >= self._next_cleanup:
            self._next_cleanup = now + self.settings.cleanup_interval
            deleted = self.processor.cleanup(retention=self.settings.retention)
            if deleted:
                log.info("inbox cleanup: deleted %d rows older than the retention", deleted)
        if self.metrics is not None and now >= self._next_depth and self._channel is not None:
            self._next_depth = now + _DEPTH_INTERVAL
            for queue in self.topology.queue_names:
                declared = self._channel.queue_declare(queue, passive=True)
                self.metrics.queue_depth(queue, int(declared.method.message_count or 0))


def _close_quietly(connection: Any) -> None:
    if connection is None or not connection.is_open:
        return
    try:
        connection.close()
    except Exception:  # the broker may be gone; the socket is released either way
        log.debug("closing the consumer's connection failed", exc_info=True)
