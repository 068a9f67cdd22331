"""The relay's PRODUCER spans: one per publish, linked to the write, ended by its outcome."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import ProxyTracerProvider, SpanKind, StatusCode

from outbox import Event
from outbox.tracing import TracerSource
from relay.messages import Outcome
from relay.tracing import PublishSpans

from .otel import Spans, ids, traceparent
from .test_relay_loop import Harness


@pytest.fixture
def spans() -> Spans:
    return Spans.recording()


@pytest.fixture
def h(tmp_path: Path, spans: Spans) -> Iterator[Harness]:
    harness = Harness(
        tmp_path, tracer_provider=spans.provider, max_attempts=3, retry_min=10, retry_max=60
    )
    yield harness
    harness.engine.dispose()


def test_each_publish_gets_a_producer_span_linked_to_the_writers_span(
    h: Harness, spans: Spans
) -> None:
    event = Event(type="order.placed", key="order:1", payload={"n": 1}, correlation_id="req-1")
    with spans.tracer.start_as_current_span("place order") as writer:
        h.write(event)
    h.step()
    assert [s.name for s in spans.finished(SpanKind.PRODUCER)] == []  # open until confirmed
    h.publisher.settle()
    h.step()

    (producer,) = spans.finished(SpanKind.PRODUCER)
    written = writer.get_span_context()
    assert producer.name == "outbox publish"
    assert producer.parent is None  # not parented across the outbox...
    assert producer.context.trace_id != written.trace_id  # ...but a trace of its own
    assert [ids(link.context) for link in producer.links] == [ids(written)]  # linked to the write
    assert producer.status.status_code is StatusCode.UNSET
    assert dict(producer.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation": "publish",
        "messaging.destination.name": "outbox",
        "messaging.rabbitmq.destination.routing_key": "order.placed",
        "messaging.message.id": str(event.id),
        "messaging.message.body.size": len(b'{"n":1}'),
        "messaging.message.conversation_id": "req-1",
        "outbox.event.type": "order.placed",
        "outbox.seq": 1,
    }
    # The consumer continues the writer's trace: the message carries its context unchanged.
    (message,) = h.publisher.published
    assert message.headers["traceparent"] == traceparent(written)


def test_a_rejected_publish_ends_its_span_with_an_error(h: Harness, spans: Spans) -> None:
    with spans.tracer.start_as_current_span("place order"):
        h.write(Event(type="order.placed", key="a"))
    h.publisher.decide = lambda m: Outcome.REJECTED
    h.step()
    h.publisher.settle()
    h.step()
    (producer,) = spans.finished(SpanKind.PRODUCER)
    assert producer.status.status_code is StatusCode.ERROR
    assert producer.status.description == "no"  # the publisher's reason
    assert (producer.attributes or {})["error.type"] == "rejected"


def test_every_attempt_is_a_span_of_its_own_all_linked_to_the_write(
    h: Harness, spans: Spans
) -> None:
    with spans.tracer.start_as_current_span("place order") as writer:
        h.write(Event(type="order.placed", key="a"))
    h.step()
    h.publisher.go_down()  # in flight: its fate is unknown, it is published again
    h.step()
    h.publisher.come_up()
    h.settle_and_step()
    lost, confirmed = spans.finished(SpanKind.PRODUCER)
    assert lost.status.status_code is StatusCode.ERROR
    assert (lost.attributes or {})["error.type"] == "unknown"
    assert confirmed.status.status_code is StatusCode.UNSET
    assert lost.context.trace_id != confirmed.context.trace_id
    for span in (lost, confirmed):
        assert [ids(link.context) for link in span.links] == [ids(writer.get_span_context())]
    assert h.relay._spans.open == 0


def test_an_event_written_outside_a_span_gets_a_producer_span_without_links(
    h: Harness, spans: Spans
) -> None:
    h.write(Event(type="order.placed"))
    h.settle_and_step()
    (producer,) = spans.finished(SpanKind.PRODUCER)
    assert producer.links == ()
    assert "traceparent" not in h.publisher.published[0].headers


def test_a_traceparent_the_caller_set_in_another_case_is_the_link(h: Harness, spans: Spans) -> None:
    with spans.tracer.start_as_current_span("caller's own") as own:
        header = traceparent(own.get_span_context())
    with spans.tracer.start_as_current_span("place order"):
        h.write(Event(type="order.placed", headers={"TraceParent": header}))
    h.settle_and_step()
    (producer,) = spans.finished(SpanKind.PRODUCER)
    assert [ids(link.context) for link in producer.links] == [ids(own.get_span_context())]
    assert h.publisher.published[0].headers["TraceParent"] == header  # unchanged


def test_a_malformed_stored_traceparent_is_no_link(h: Harness, spans: Spans) -> None:
    h.write(Event(type="order.placed", headers={"traceparent": "not-a-trace"}))
    h.settle_and_step()
    (producer,) = spans.finished(SpanKind.PRODUCER)
    assert producer.links == ()


def test_spans_that_are_not_sampled_are_not_kept(tmp_path: Path) -> None:
    spans = Spans.recording(sampler=ALWAYS_OFF)
    h = Harness(tmp_path, tracer_provider=spans.provider)
    try:
        h.write(Event(type="a", key="a"), Event(type="b", key="b"))
        h.step()
        assert len(h.publisher.outstanding) == 2
        assert h.relay._spans.open == 0
        h.settle_and_step()
        assert spans.finished() == []
    finally:
        h.engine.dispose()


def test_without_a_configured_provider_no_span_is_started() -> None:
    assert isinstance(trace.get_tracer_provider(), ProxyTracerProvider)  # nobody set one here
    assert TracerSource("outbox.relay").tracer() is None
    PublishSpans().published([])  # and the hook returns at once


def test_the_global_provider_is_used_once_it_is_configured(
    monkeypatch: pytest.MonkeyPatch, spans: Spans
) -> None:
    source = TracerSource("outbox.relay")
    assert source.tracer() is None
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: spans.provider)
    assert source.tracer() is not None
