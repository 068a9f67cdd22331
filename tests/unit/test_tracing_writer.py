"""The writer stores the current trace context with each event (OpenTelemetry installed)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import outbox
from outbox import AggregateRoot, Event, Outbox
from outbox.tracing import current_trace_headers

from .otel import Spans, traceparent


class Base(DeclarativeBase):
    pass


class Order(Base, AggregateRoot):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)


box = Outbox(Base.metadata)


@pytest.fixture
def spans() -> Spans:
    return Spans.recording()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/writer.db")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def stored_headers(engine: sa.Engine) -> list[dict[str, str] | None]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(box.events.c.headers).order_by(box.events.c.seq))
        return [json.loads(h) if h is not None else None for (h,) in rows]


def write(engine: sa.Engine, *events: Event) -> None:
    with engine.begin() as conn:
        outbox.write(conn, *events, outbox=box)


def remote_parent_with_tracestate() -> Any:
    """A context whose current span came from upstream with a `tracestate`."""
    parent = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "v1"), ("other", "x")]),
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


def test_write_stores_traceparent_and_tracestate_of_the_current_span(
    engine: sa.Engine, spans: Spans
) -> None:
    with spans.tracer.start_as_current_span("place order", remote_parent_with_tracestate()) as s:
        write(engine, Event(type="order.placed", headers={"tenant": "acme"}), Event(type="b"))
    expected = {"traceparent": traceparent(s.get_span_context()), "tracestate": "vendor=v1,other=x"}
    assert stored_headers(engine) == [{"tenant": "acme", **expected}, expected]


def test_write_outside_any_span_stores_no_trace_headers(engine: sa.Engine, spans: Spans) -> None:
    write(engine, Event(type="a"), Event(type="b", headers={"tenant": "acme"}))
    assert stored_headers(engine) == [None, {"tenant": "acme"}]


def test_an_unsampled_span_is_stored_with_its_flags(engine: sa.Engine) -> None:
    # The sampling decision travels with the context: downstream must not sample it in.
    unsampled = SpanContext(0x1, 0x2, is_remote=False, trace_flags=TraceFlags(0))
    with trace.use_span(NonRecordingSpan(unsampled)):
        write(engine, Event(type="a"))
    assert stored_headers(engine) == [{"traceparent": f"00-{1:032x}-{2:016x}-00"}]


@pytest.mark.parametrize(
    "own",
    [
        {"TraceParent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        {"tracestate": "mine=1"},
    ],
)
def test_trace_headers_the_caller_set_are_kept_as_they_are(
    engine: sa.Engine, spans: Spans, own: dict[str, str]
) -> None:
    with spans.tracer.start_as_current_span("place order", remote_parent_with_tracestate()):
        write(engine, Event(type="a", headers=own))
    assert stored_headers(engine) == [own]


def test_tracing_adds_no_statement_and_never_commits(engine: sa.Engine, spans: Spans) -> None:
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with spans.tracer.start_as_current_span("place order"), engine.connect() as conn:
        conn.begin()
        outbox.write(conn, Event(type="a"), Event(type="b"), Event(type="c"), outbox=box)
        conn.rollback()  # the caller's decision: nothing was committed behind its back
    assert len(statements) == 1 and statements[0].startswith("INSERT INTO outbox")
    assert stored_headers(engine) == []


async def _write_async(url: str, span_tracer: Any) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        with span_tracer.start_as_current_span("async use case"):
            async with engine.begin() as conn:
                await outbox.write_async(conn, Event(type="a"), outbox=box)
    finally:
        await engine.dispose()


@pytest.mark.asyncio
async def test_write_async_stores_the_context_of_the_awaiting_task(
    engine: sa.Engine, spans: Spans, tmp_path: Path
) -> None:
    await _write_async(f"sqlite+aiosqlite:///{tmp_path}/writer.db", spans.tracer)
    (span,) = spans.finished()
    assert stored_headers(engine) == [{"traceparent": traceparent(span.context)}]


def test_aggregate_events_carry_the_context_of_record_not_of_the_flush(
    engine: sa.Engine, spans: Spans
) -> None:
    sessions = sessionmaker(engine)
    outbox.install(sessions, outbox=box)
    with sessions() as session:
        with spans.tracer.start_as_current_span("place order") as recording:
            order = Order()
            session.add(order)
            order.record("order.placed")  # new aggregate: its id is filled in at the flush
        order.record("order.untraced")  # recorded outside any span
        with spans.tracer.start_as_current_span("commit"):
            session.commit()
    assert stored_headers(engine) == [
        {"traceparent": traceparent(recording.get_span_context())},
        None,
    ]


def test_pending_events_are_what_was_recorded(engine: sa.Engine, spans: Spans) -> None:
    with Session(engine) as session:
        order = Order(id=1)
        session.add(order)
        with spans.tracer.start_as_current_span("place order"):
            event = order.record("order.placed")
        assert order.pending_events == (event,)
        assert dict(event.headers) == {}  # the context is added when it is written


def test_a_writer_ignores_opentelemetry_while_another_thread_imports_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`opentelemetry.trace` is in sys.modules from the moment another thread starts importing
    it (the relay does on its first publish), before its functions exist: a writer in a
    thread of its own looked it up then and failed its transaction (found by the fault
    suite). No span can be current before the module is loaded, so there is none to store."""
    import importlib.machinery
    import sys
    import types

    half = types.ModuleType("opentelemetry.trace")
    half.__spec__ = importlib.machinery.ModuleSpec("opentelemetry.trace", None)
    half.__spec__._initializing = True  # type: ignore[attr-defined]  # what importlib sets
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", half)
    assert current_trace_headers() == {}
