"""PRODUCER spans for the relay's publishes (OpenTelemetry, optional: `outbox-relay[otel]`).

Every publish of an event gets a span "<exchange> publish" of kind PRODUCER (messaging
semantic conventions as of v1.24: `messaging.system=rabbitmq`, `messaging.operation=publish`,
the exchange as `messaging.destination.name`, the routing key, the event id as
`messaging.message.id`). It starts when the relay hands the message to the publisher and ends
when its outcome arrives: a confirm (status unset), or a rejection or a lost connection
(status error, `error.type` = `rejected` or `unknown`).

How the spans relate, and why:
- The message carries the writer's `traceparent` unchanged (the relay adds nothing to it), so
  the consumer's span is a child of the span that wrote the event: one trace from
  `outbox.write()` to the handler, as the messaging conventions propagate a message's
  *creation* context.
- The PRODUCER span is the root of a trace of its own, with a link to the writer's span
  context; it is never its child. A publish happens seconds or days after the write, in
  another process, possibly many times for one event (every retry and every redelivery after
  a lost connection is a publish): as children they would stretch and clutter the writer's
  trace with the relay's housekeeping. A link still leads from each attempt to the write. (The
  conventions ask the same of a "send" span whose message was created elsewhere: link to the
  creation context.)
- An event written outside any span gets a PRODUCER span without links, and the consumer's
  span is a root.

Cost: with OpenTelemetry not installed, `published()` and `settled()` return after one
attribute check; with it installed but no tracer provider configured, after looking the global
provider up once per batch. Spans are kept only while they are recording (sampled in).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from outbox.tracing import TracerSource, linked_span_context
from relay.messages import Outcome, OutgoingMessage, PublishOutcome

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

INSTRUMENTATION_NAME = "outbox.relay"


class PublishSpans:
    """One PRODUCER span per published message, ended by its outcome (keyed by its tag)."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self._source = TracerSource(INSTRUMENTATION_NAME, tracer_provider)
        self._open: dict[int, Span] = {}

    def published(self, messages: Sequence[OutgoingMessage]) -> None:
        """`messages` are being handed to the publisher: start their spans."""
        tracer = self._source.tracer()
        if tracer is None:
            return
        from opentelemetry import context, trace

        root = context.Context()  # never a child of whatever is current in this thread
        for message in messages:
            linked = linked_span_context(message.headers)
            attributes: dict[str, str | int] = {
                "messaging.system": "rabbitmq",
                "messaging.operation": "publish",
                "messaging.destination.name": message.exchange,
                "messaging.rabbitmq.destination.routing_key": message.routing_key,
                "messaging.message.id": message.message_id,
                "messaging.message.body.size": len(message.body),
                "outbox.event.type": message.type,
                "outbox.seq": message.tag,
            }
            if message.correlation_id is not None:
                attributes["messaging.message.conversation_id"] = message.correlation_id
            span = tracer.start_span(
                f"{message.exchange or '(default)'} publish",
                context=root,
                kind=trace.SpanKind.PRODUCER,
                links=[trace.Link(linked)] if linked is not None else None,
                attributes=attributes,
            )
            if not span.is_recording():
                continue
            earlier = self._open.pop(message.tag, None)
            if earlier is not None:  # the publisher owes it an outcome; never leave it open
                earlier.end()
            self._open[message.tag] = span

    def settled(self, outcome: PublishOutcome) -> None:
        """The outcome of a published message arrived: end its span."""
        if not self._open:
            return
        span = self._open.pop(outcome.tag, None)
        if span is None:
            return
        if outcome.outcome is not Outcome.CONFIRMED:
            from opentelemetry.trace import Status, StatusCode

            span.set_attribute("error.type", outcome.outcome.value)
            description = outcome.error or (
                "connection lost before the broker confirmed"
                if outcome.outcome is Outcome.UNKNOWN
                else "rejected by the broker"
            )
            span.set_status(Status(StatusCode.ERROR, description))
        span.end()

    @property
    def open(self) -> int:
        """Spans waiting for their outcome."""
        return len(self._open)
