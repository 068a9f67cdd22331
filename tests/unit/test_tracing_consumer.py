"""The consumer's CONSUMER spans: handlers run inside a child of the message's trace context."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy.orm import Session, sessionmaker

from outbox.consumer import Handlers, Inbox, Message, Outcome, Processor, RetryPolicy
from outbox.domain import DomainEvents

from .otel import Spans, ids, traceparent

WRITER_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
WRITER_SPAN = 0xB7AD6B7169203331
WRITER_TRACEPARENT = f"00-{WRITER_TRACE:032x}-{WRITER_SPAN:016x}-01"


class Seen:
    """What the handler saw as its current span, and whether it should fail."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.fail = False


@pytest.fixture
def spans() -> Spans:
    return Spans.recording()


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def processor(tmp_path: Path, spans: Spans, seen: Seen) -> Iterator[Processor]:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/inbox.db")
    inbox = Inbox(sa.MetaData())
    inbox.create(engine)
    handlers = Handlers("billing", DomainEvents(), inbox=inbox)

    @handlers.on("order.placed")
    def book(message: Message, session: Session) -> None:
        seen.spans.append(trace.get_current_span())
        if seen.fail:
            raise RuntimeError("booking failed")

    yield Processor(
        handlers,
        sessionmaker(engine),
        policy=RetryPolicy(max_attempts=2, retry_min=0, retry_max=0),
        sleep=lambda s: None,
        tracer_provider=spans.provider,
    )
    engine.dispose()


def message(**headers: Any) -> Message:
    return Message(
        message_id=str(uuid.uuid4()),
        type="order.placed",
        key="order:1",
        seq=7,
        body=b"{}",
        headers={"ordering-key": "order:1", "outbox-seq": 7, **headers},
        routing_key="order.placed",
    )


def test_the_handler_runs_in_a_consumer_span_child_of_the_writers_span(
    processor: Processor, spans: Spans, seen: Seen
) -> None:
    delivered = message(traceparent=WRITER_TRACEPARENT, tracestate="vendor=v1")
    result = processor.process(delivered, queue="billing.2")
    assert result.outcome is Outcome.HANDLED

    (span,) = spans.finished()
    assert span.kind is SpanKind.CONSUMER
    assert span.name == "billing.2 process"
    assert ids(span.parent) == (WRITER_TRACE, WRITER_SPAN)  # same trace as the write
    assert span.context.trace_state.get("vendor") == "v1"
    (current,) = seen.spans
    assert ids(current.get_span_context()) == ids(span.context)  # what the handler sees
    assert span.status.status_code is StatusCode.UNSET
    assert dict(span.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation": "process",
        "messaging.destination.name": "billing.2",
        "messaging.rabbitmq.destination.routing_key": "order.placed",
        "messaging.message.id": delivered.message_id,
        "messaging.message.body.size": 2,
        "outbox.consumer.group": "billing",
        "outbox.event.type": "order.placed",
        "outbox.seq": 7,
        "outbox.consumer.outcome": "handled",
        "outbox.consumer.attempts": 1,
    }


def test_header_values_as_bytes_are_understood(processor: Processor, spans: Spans) -> None:
    processor.process(message(traceparent=WRITER_TRACEPARENT.encode()))
    (span,) = spans.finished()
    assert span.name == "billing process"  # no queue given: the group names it
    assert ids(span.parent) == (WRITER_TRACE, WRITER_SPAN)


@pytest.mark.parametrize("name", ["TraceParent", "TRACEPARENT"])
def test_a_traceparent_the_caller_set_in_another_case_is_the_parent(
    processor: Processor, spans: Spans, name: str
) -> None:
    # The writer keeps a caller's `TraceParent` and then stores no context of its own (README,
    # "Tracing"): ignoring it here would leave the message with no usable context at all.
    processor.process(message(**{name: WRITER_TRACEPARENT, "TraceState": "vendor=v1"}))
    (span,) = spans.finished()
    assert ids(span.parent) == (WRITER_TRACE, WRITER_SPAN)
    assert span.context.trace_state.get("vendor") == "v1"


def test_the_lower_case_traceparent_wins_over_another_spelling(
    processor: Processor, spans: Spans
) -> None:
    other = f"00-{WRITER_TRACE:032x}-{1:016x}-01"
    processor.process(message(Traceparent=other, traceparent=WRITER_TRACEPARENT))
    (span,) = spans.finished()
    assert ids(span.parent) == (WRITER_TRACE, WRITER_SPAN)


@pytest.mark.parametrize("headers", [{}, {"traceparent": "00-zz-yy-01"}])
def test_without_a_usable_context_the_span_is_a_root(
    processor: Processor, spans: Spans, headers: dict[str, str]
) -> None:
    with spans.tracer.start_as_current_span("caller"):  # never adopted as the parent
        processor.process(message(**headers))
    span = next(s for s in spans.finished() if s.kind is SpanKind.CONSUMER)
    assert span.parent is None


def test_a_failing_handler_retries_inside_one_span_that_ends_in_error(
    processor: Processor, spans: Spans, seen: Seen
) -> None:
    seen.fail = True
    result = processor.process(message(traceparent=WRITER_TRACEPARENT))
    assert result.outcome is Outcome.PARKED
    (span,) = spans.finished()
    assert len(seen.spans) == 2  # both attempts...
    assert {ids(s.get_span_context()) for s in seen.spans} == {ids(span.context)}  # ...in it
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "RuntimeError: booking failed"
    assert (span.attributes or {})["error.type"] == "failed"
    assert (span.attributes or {})["outbox.consumer.attempts"] == 2


def test_a_duplicate_is_a_span_too(processor: Processor, spans: Spans, seen: Seen) -> None:
    delivered = message(traceparent=WRITER_TRACEPARENT)
    processor.process(delivered)
    processor.process(delivered)
    first, second = spans.finished()
    assert (second.attributes or {})["outbox.consumer.outcome"] == "duplicate"
    assert ids(second.parent) == ids(first.parent)
    assert len(seen.spans) == 1


def test_the_writers_traceparent_round_trips(spans: Spans) -> None:
    with spans.tracer.start_as_current_span("w") as writer:
        header = traceparent(writer.get_span_context())
    from outbox.tracing import extract_context

    context = extract_context({"traceparent": header})
    assert context is not None
    assert ids(trace.get_current_span(context).get_span_context()) == ids(writer.get_span_context())
