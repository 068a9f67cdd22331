"""One trace from `outbox.write()` to the handler, on the real PostgreSQL and RabbitMQ.

The relationships asserted here are the ones relay/tracing.py documents: the consumer's span is
a child of the writer's span (same trace); the relay's PRODUCER span is a root of its own trace,
linked to the writer's span.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy.orm import sessionmaker

import outbox
from outbox import Event, Outbox
from outbox.consumer import Processor
from relay.consumer.runner import Consumer, ConsumerSettings
from relay.settings import RelaySettings
from tests.consumer.app import build
from tests.consumer.broker import cleaned_up
from tests.support.rabbit import unique_name
from tests.support.relays import relay_thread
from tests.unit.otel import Spans, ids, traceparent


def test_one_trace_from_outbox_write_to_the_handler(
    pg_engine: sa.Engine, pg_url: str, amqp_url: str, schema_name: str, outbox_schema: Outbox
) -> None:
    spans = Spans.recording()
    app = build(schema_name, name=unique_name("grp"))
    app.create(pg_engine)
    in_handler: list[Any] = []
    app.faults.inside_handler = lambda event: in_handler.append(trace.get_current_span())
    exchange = unique_name("ex")
    consumer = Consumer(
        Processor(app.handlers, sessionmaker(pg_engine), tracer_provider=spans.provider),
        ConsumerSettings(amqp_url=amqp_url, name=unique_name("c"), exchange=exchange, queues=2),
    )
    with cleaned_up(amqp_url, consumer.topology):
        consumer.start()  # declares the exchange, the queues and their bindings

        # Given an event written inside the application's span
        with spans.tracer.start_as_current_span("place order") as placing, pg_engine.begin() as c:
            payload = {"order_id": "1", "n": 1, "total": "9.99", "currency": "EUR"}
            event = Event(type="order.placed", version=3, key="order:1", payload=payload)
            outbox.write(c, event, outbox=outbox_schema)
        writer = placing.get_span_context()

        # When the relay publishes it and the consumer applies it
        settings = RelaySettings(
            database_url=pg_url,
            amqp_url=amqp_url,
            schema=schema_name,
            exchange=exchange,
            name=unique_name("relay"),
        )
        with relay_thread(settings, tracer_provider=spans.provider):
            for _ in range(200):
                consumer.run_once(timeout=0.1)
                if in_handler:
                    break
        consumer.close()

    # Then the stored row carries the writer's context
    with pg_engine.connect() as conn:
        stored = conn.execute(sa.select(outbox_schema.events.c.headers)).scalar_one()
    assert json.loads(stored) == {"traceparent": traceparent(writer)}

    # and the handler ran inside a CONSUMER span that is a child of the writer's span
    (processing,) = spans.finished(SpanKind.CONSUMER)
    assert processing.name in {f"{q} process" for q in consumer.topology.queue_names}
    assert processing.context.trace_id == writer.trace_id
    assert ids(processing.parent) == ids(writer)
    assert (processing.attributes or {})["messaging.message.id"] == str(event.id)
    assert (processing.attributes or {})["outbox.consumer.outcome"] == "handled"
    (current,) = in_handler
    assert ids(current.get_span_context()) == ids(processing.context)

    # and the relay's PRODUCER span is linked to the writer's span, in a trace of its own
    (publishing,) = spans.finished(SpanKind.PRODUCER)
    assert publishing.name == f"{exchange} publish"
    assert publishing.parent is None
    assert publishing.context.trace_id != writer.trace_id
    assert [ids(link.context) for link in publishing.links] == [ids(writer)]
    assert publishing.status.status_code is StatusCode.UNSET  # confirmed
    assert (publishing.start_time or 0) <= (processing.start_time or 0)
    assert (publishing.attributes or {})["messaging.message.id"] == str(event.id)

    # and nothing else was traced
    assert sorted(s.name for s in spans.finished()) == sorted(
        ["place order", publishing.name, processing.name]
    )
