"""A user without `configure` permission on the relay's exchange is a topology refusal (exit
6), not an outage retried forever (found by review).

exchange.declare answered with 403 ACCESS_REFUSED closes the channel during setup; only 406 is
treated as fatal (exit 6) in AmqpPublisher._on_channel_closed, so the publisher reopens the
channel with backoff forever: never ready, no exit, no dead letter — a permanent refusal
treated as transient. (Driven with fakes: the shared broker must not be reconfigured with a
restricted user.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pika.exceptions

from relay.messages import BrokerStatus, PublisherEvent
from relay.publisher import AmqpPublisher


class _Loop:
    def __init__(self) -> None:
        self.later: list[tuple[float, Any]] = []

    def call_later(self, delay: float, cb: Any) -> None:
        self.later.append((delay, cb))


class _Connection:
    is_open = True
    is_closing = False
    is_closed = False

    def __init__(self) -> None:
        self.ioloop = _Loop()
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_access_refused_on_declare_is_fatal() -> None:
    events: list[PublisherEvent] = []

    def sink(batch: Sequence[PublisherEvent]) -> None:
        events.extend(batch)

    pub = AmqpPublisher(
        "amqp://relay:pw@127.0.0.1:5672/%2F", sink, connection_name="review", exchange="events"
    )
    connection = _Connection()
    channel = object()
    pub._connection = connection  # type: ignore[assignment]
    pub._channel = channel  # type: ignore[assignment]
    pub._declaring = True
    pub._on_channel_closed(
        channel,  # type: ignore[arg-type]
        pika.exceptions.ChannelClosedByBroker(
            403,
            "ACCESS_REFUSED - configure access to exchange 'events' in vhost '/' refused "
            "for user 'relay'",
        ),
    )
    statuses = [e for e in events if isinstance(e, BrokerStatus)]
    assert any(s.fatal for s in statuses), (
        f"retried forever instead: statuses={statuses}, reopen scheduled={connection.ioloop.later}"
    )
