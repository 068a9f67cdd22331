"""Broker helpers of the consumer tests: publish as the relay does, clean up a group."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pika

from outbox.consumer import Message
from relay.consumer.topology import Topology

logger = logging.getLogger(__name__)


def publish(amqp_url: str, exchange: str, messages: list[Message]) -> None:
    """Publish with the relay's properties and headers, confirmed and mandatory."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for message in messages:
            headers = dict(message.headers)
            headers.setdefault("event-version", message.version)
            channel.basic_publish(
                exchange,
                message.routing_key or message.type,
                message.body,
                pika.BasicProperties(
                    message_id=message.message_id or None,
                    type=message.type,
                    headers=headers,
                    delivery_mode=2,
                    content_type="application/json",
                ),
                mandatory=True,
            )
    finally:
        connection.close()


@contextlib.contextmanager
def cleaned_up(amqp_url: str, topology: Topology) -> Iterator[Topology]:
    """Delete the group's queues and exchanges afterwards (never raises)."""
    try:
        yield topology
    finally:
        try:
            connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
            channel = connection.channel()
            for queue in topology.queue_names:
                channel.queue_delete(queue)
            channel.exchange_delete(topology.hash_exchange)
            channel.exchange_delete(topology.exchange)
            connection.close()
        except Exception as exc:
            logger.warning("cleanup of %s failed: %s", topology.group, exc)
