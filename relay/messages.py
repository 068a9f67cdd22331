"""What crosses the boundary between the relay loop and the publisher thread.

The publisher never sees database rows and the relay never sees pika frames: the relay hands
over `OutgoingMessage`s and receives `PublishOutcome`s (one per message, always) and
`BrokerStatus` changes, through a callback that must be thread-safe.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol


class OutgoingMessage(NamedTuple):
    """One AMQP message. `tag` is the relay's handle for it (the outbox row's seq).

    Named tuples rather than frozen dataclasses for what is made once per event: see
    `relay.records.ClaimedEvent`."""

    tag: int
    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    type: str
    timestamp: int  # seconds since the epoch (AMQP timestamp)
    headers: Mapping[str, Any]
    correlation_id: str | None = None
    content_type: str = "application/json"
    app_id: str = "outbox-relay"
    # `time.monotonic()` after which the message must not be sent: the relay's lease on it
    # may have passed to another relay (a process frozen between handing it over and the
    # I/O loop sending it). None: no limit.
    send_by: float | None = None


class Outcome(enum.Enum):
    CONFIRMED = "confirmed"  # broker ack, message was routed: done
    REJECTED = "rejected"  # nack, return (unroutable) or channel error: spend an attempt
    UNKNOWN = "unknown"  # connection lost before a confirm: publish again, attempt not spent


class PublishOutcome(NamedTuple):
    tag: int
    outcome: Outcome
    error: str | None = None
    # False for a refusal no retry can change (larger than the broker's max message size, not
    # encodable): the event goes dead at once instead of spending its remaining attempts.
    retryable: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerStatus:
    """The publisher connected (`up=True`, ready to publish) or lost its connection."""

    up: bool
    error: str | None = None
    fatal: bool = False  # a configuration problem retrying will not fix
    # With `fatal`: the broker refused the login or the virtual host (exit code 4), rather
    # than the relay's topology (exit code 6).
    refused: bool = False
    node: str | None = None  # the broker address (host:port) this is about, for logs/metrics


PublisherEvent = PublishOutcome | BrokerStatus
Sink = Callable[[Sequence[PublisherEvent]], None]


class Publisher(Protocol):
    """Publishes with confirms; reports exactly one PublishOutcome per message given."""

    @property
    def ready(self) -> bool:
        """Connected with confirms enabled: publish() will be attempted."""
        ...

    def start(self) -> None: ...

    def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        """Hand messages over (non-blocking). Outcomes arrive later through the sink."""
        ...

    def flush(self) -> None:
        """On the relay loop's thread: send what `publish` was given now, rather than when the
        loop next waits (for a step that blocks next: a claim on the loop's thread)."""
        ...

    def stop(self, timeout: float) -> None:
        """Close the connection and stop the I/O thread (bounded by `timeout`)."""
        ...
