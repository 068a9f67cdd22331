"""OpenTelemetry in tests: a tracer provider of the test's own, exporting to memory.

No test sets the global tracer provider (it can be set once per process): the code under test
gets the provider explicitly, and the spans made current here live in the context variable
that `opentelemetry.trace.get_current_span()` reads whatever the provider.
"""

from __future__ import annotations

import dataclasses

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.trace import SpanContext, SpanKind, Tracer


@dataclasses.dataclass
class Spans:
    provider: TracerProvider
    exporter: InMemorySpanExporter

    @classmethod
    def recording(cls, sampler: Sampler | None = None) -> Spans:
        provider = TracerProvider(sampler=sampler) if sampler else TracerProvider()
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return cls(provider, exporter)

    @property
    def tracer(self) -> Tracer:
        return self.provider.get_tracer("tests")

    def finished(self, kind: SpanKind | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if kind is None or s.kind is kind]


def traceparent(context: SpanContext) -> str:
    """The W3C header for `context`, built here independently of the propagator."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def ids(context: SpanContext | None) -> tuple[int, int] | None:
    """(trace id, span id): a link or parent read back is remote, the span it names was not."""
    return None if context is None else (context.trace_id, context.span_id)
