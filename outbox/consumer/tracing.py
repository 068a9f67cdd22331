"""CONSUMER spans around message processing (OpenTelemetry, optional: `outbox-relay[otel]`).

Each message the processor takes in hand runs inside a span "<queue> process" (the consumer
group's name when the queue is not known, e.g. for a replay of a parked message) of kind
CONSUMER, whose parent is the trace context the message carries: the writer's span, which the
relay publishes unchanged (see relay/tracing.py). The handlers run inside it, so
`opentelemetry.trace.get_current_span()` in a handler is this span, and whatever the handler
traces (SQL, HTTP) lands in the writer's trace. The span covers the whole inbox transaction
and every in-place retry; a message that ends parked (or stale) sets the span's status to
error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from outbox.consumer.message import Message
from outbox.tracing import TracerSource, consumer_span

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

    from outbox.consumer.processor import Result

INSTRUMENTATION_NAME = "outbox.consumer"

ResultNote = Callable[["Result"], None]


def _ignore(result: Result) -> None:
    pass


class ProcessSpans:
    """Starts the CONSUMER span of each message of one consumer group (or nothing)."""

    def __init__(self, group: str, tracer_provider: TracerProvider | None = None) -> None:
        self.group = group
        self._source = TracerSource(INSTRUMENTATION_NAME, tracer_provider)

    @contextlib.contextmanager
    def process(self, message: Message, *, queue: str | None = None) -> Iterator[ResultNote]:
        """Run the block inside the message's span; call what it yields with the result."""
        tracer = self._source.tracer()
        if tracer is None:
            yield _ignore
            return
        attributes: dict[str, str | int] = {
            "messaging.system": "rabbitmq",
            "messaging.operation": "process",
            "messaging.destination.name": queue or self.group,
            "messaging.message.id": message.message_id,
            "messaging.message.body.size": len(message.body),
            "outbox.consumer.group": self.group,
            "outbox.event.type": message.type,
        }
        if message.routing_key:
            attributes["messaging.rabbitmq.destination.routing_key"] = message.routing_key
        if message.seq is not None:
            attributes["outbox.seq"] = message.seq
        with consumer_span(
            tracer, f"{queue or self.group} process", message.headers, attributes
        ) as span:
            yield lambda result: _note(span, result)


def _note(span: Span, result: Result) -> None:
    from opentelemetry.trace import Status, StatusCode

    from outbox.consumer.processor import Outcome

    span.set_attribute("outbox.consumer.outcome", result.outcome.value)
    span.set_attribute("outbox.consumer.attempts", result.attempts)
    if result.outcome in (Outcome.PARKED, Outcome.STALE):
        span.set_attribute("error.type", result.reason or result.outcome.value)
        # A handler's error is its traceback: the last line names the exception.
        lines = (result.error or "").strip().splitlines()
        span.set_status(Status(StatusCode.ERROR, lines[-1] if lines else result.outcome.value))
