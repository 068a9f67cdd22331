"""A consumer group's RabbitMQ topology: a consistent-hash exchange and N ordered queues.

    relay's exchange --(one binding per subscribed type)--> <group>.hash (x-consistent-hash,
    hash-header: ordering-key) --(weight 1 each)--> <group>.0 ... <group>.N-1

Why per-key order holds: the hash exchange sends every message of one `ordering-key` to the
same queue (while the ring does not change); each queue is a quorum queue with
`x-single-active-consumer`, so one consumer at a time receives it, in queue order, and the
others stand by to take over. A message without the header goes to one arbitrary queue.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.exchange_type import ExchangeType

from relay.errors import BrokerConfigError, ConfigError

HASH_HEADER = "ordering-key"
HASH_EXCHANGE_TYPE = "x-consistent-hash"
PLUGIN = "rabbitmq_consistent_hash_exchange"
QUEUE_TYPES = ("quorum", "classic")
DEFAULT_QUEUES = 4
MAX_QUEUES = 256


@dataclasses.dataclass(frozen=True)
class Topology:
    group: str
    exchange: str
    routing_keys: tuple[str, ...]  # bound on the relay's exchange: by default the event types
    queues: int = DEFAULT_QUEUES
    queue_type: str = "quorum"
    source_exchange_type: str = "topic"
    hash_exchange_type: str = HASH_EXCHANGE_TYPE

    def __post_init__(self) -> None:
        if not 1 <= self.queues <= MAX_QUEUES:
            raise ConfigError(f"queues must be between 1 and {MAX_QUEUES}, got {self.queues}")
        if self.queue_type not in QUEUE_TYPES:
            raise ConfigError(f"queue_type must be one of {QUEUE_TYPES}, got {self.queue_type!r}")
        if not self.routing_keys:
            raise ConfigError(
                f"consumer {self.group!r} subscribes to no event type: register a handler with "
                "@handlers.on(...)"
            )

    @property
    def hash_exchange(self) -> str:
        return f"{self.group}.hash"

    @property
    def queue_names(self) -> tuple[str, ...]:
        return tuple(f"{self.group}.{i}" for i in range(self.queues))

    def queue_arguments(self) -> dict[str, Any]:
        arguments: dict[str, Any] = {"x-single-active-consumer": True}
        if self.queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
        return arguments

    def declare(self, channel: BlockingChannel) -> None:
        """Declare everything (idempotent). A refusal becomes BrokerConfigError with the fix."""
        step = f"exchange {self.exchange!r}"
        try:
            channel.exchange_declare(
                self.exchange, exchange_type=ExchangeType(self.source_exchange_type), durable=True
            )
            step = f"exchange {self.hash_exchange!r}"
            channel.exchange_declare(
                self.hash_exchange,
                exchange_type=self.hash_exchange_type,  # type: ignore[arg-type]  # a plugin's
                durable=True,
                arguments={"hash-header": HASH_HEADER},
            )
            for routing_key in self.routing_keys:
                step = f"binding of {routing_key!r}"
                channel.exchange_bind(self.hash_exchange, self.exchange, routing_key=routing_key)
            for queue in self.queue_names:
                step = f"queue {queue!r}"
                channel.queue_declare(queue, durable=True, arguments=self.queue_arguments())
                # The binding key of a consistent-hash binding is the queue's weight.
                channel.queue_bind(queue, self.hash_exchange, routing_key="1")
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise BrokerConfigError(_explain(step, exc)) from exc
        except pika.exceptions.ConnectionClosedByBroker as exc:
            # An unknown exchange type (the plugin is off) closes the whole connection.
            if exc.reply_code == 503 and "exchange type" in exc.reply_text:
                raise BrokerConfigError(_explain(step, exc)) from exc
            raise


def _explain(
    step: str, exc: pika.exceptions.ChannelClosedByBroker | pika.exceptions.ConnectionClosedByBroker
) -> str:
    text = f"the broker refused the {step}: {exc.reply_code} {exc.reply_text}"
    if "exchange type" in exc.reply_text:
        text += f"; enable the plugin: rabbitmq-plugins enable {PLUGIN}"
    elif exc.reply_code == 406:
        text += (
            " (it exists with other settings: delete it, or keep --queue-type and the relay's "
            "--exchange-type as they were)"
        )
    return text
