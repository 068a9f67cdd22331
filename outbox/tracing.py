"""Trace context across the outbox (OpenTelemetry, optional: `outbox-relay[otel]`).

The writer stores the W3C trace context of the span current at `write()` (or at `record()` for
an aggregate) in the event's headers, as `traceparent` and `tracestate`; the relay publishes
them unchanged as AMQP headers; the consumer starts its CONSUMER span as a child of that
context. One trace goes from the code that wrote the event to its handlers. The relay's
PRODUCER span (relay/tracing.py) is linked to the same context, not parented: see there why.

Why W3C TraceContext explicitly rather than the globally configured propagator: the context
is read by other processes (the relay, every consumer group) that may be configured with
another propagator, possibly much later. A fixed, documented format is the contract between
them. The global propagator usually also injects `baggage`, which would then be stored in the
outbox table and its retention: application data we should not copy into a durable row unasked.

Why nothing is imported without OpenTelemetry:
- The writer looks for `opentelemetry.trace` in `sys.modules` and never imports it. A span
  can only be current once that module is loaded (it owns the context key that holds the
  current span), so an application that never loaded it has no trace context to store.
- The relay and the consumer import `opentelemetry.trace` when they are built, guarded: when
  it is not installed they trace nothing. When it is installed, the global tracer provider is
  looked up on every use, so a provider configured after start-up (or through
  `OTEL_PYTHON_TRACER_PROVIDER`) is picked up; with none configured, no span is started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import sys
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from outbox.event import Event

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanContext, Tracer, TracerProvider
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACE_HEADERS = frozenset({TRACEPARENT, TRACESTATE})
"""The headers the writer stores; compared case-insensitively with the caller's own."""

_TRACE_MODULE = "opentelemetry.trace"


# -- the writer's side ---------------------------------------------------------------------


def current_trace_headers() -> dict[str, str]:
    """`traceparent` (and `tracestate` if any) of the current span; {} when there is none.

    A span context that is valid but not sampled is stored too, as W3C propagation does: the
    sampling decision travels with it in the trace flags.
    """
    trace = sys.modules.get(_TRACE_MODULE)
    if trace is None or _initializing(trace):
        # Never loaded, or being imported by another thread right now (it is in sys.modules
        # before its body has run): no span can be current yet (see the module docstring).
        return {}
    if not trace.get_current_span().get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    _w3c().inject(carrier)
    return carrier


def _initializing(module: object) -> bool:
    """The module is still being imported (importlib marks its spec until the body ran)."""
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def merged_headers(headers: Mapping[str, str], trace: Mapping[str, str]) -> Mapping[str, str]:
    """`headers` with `trace` added, unless they carry a trace context already.

    A caller that sets `traceparent` or `tracestate` itself (in any case) keeps exactly what
    it set: both are left alone, so that a `tracestate` never sits beside another span's
    `traceparent`.
    """
    if not trace or any(name.lower() in TRACE_HEADERS for name in headers):
        return headers
    return {**headers, **trace}


def with_trace_headers(event: Event, trace: Mapping[str, str]) -> Event:
    """`event` with `trace` in its headers, by the rule of `merged_headers()`."""
    headers = merged_headers(event.headers, trace)
    return event if headers is event.headers else dataclasses.replace(event, headers=headers)


@functools.cache
def _w3c() -> TraceContextTextMapPropagator:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


# -- the relay's and the consumer's side ---------------------------------------------------


def load_trace_api() -> ModuleType | None:
    """`opentelemetry.trace`, or None when opentelemetry-api is not installed."""
    try:
        return importlib.import_module(_TRACE_MODULE)
    except ImportError:
        return None


class TracerSource:
    """The tracer to start spans with, or None: not installed, or no provider configured.

    With `tracer_provider` given, that provider is used; otherwise the global one, looked up
    at each call (a dictionary lookup and an isinstance check when none is configured).
    """

    def __init__(self, name: str, tracer_provider: TracerProvider | None = None) -> None:
        self._name = name
        self._explicit = tracer_provider
        self._api = load_trace_api()
        self._provider: object = None
        self._tracer: Tracer | None = None

    def tracer(self) -> Tracer | None:
        api = self._api
        if api is None:
            return None
        provider = self._explicit or api.get_tracer_provider()
        if provider is not self._provider:
            self._provider = provider
            unconfigured = isinstance(provider, api.ProxyTracerProvider | api.NoOpTracerProvider)
            self._tracer = None if unconfigured else provider.get_tracer(self._name)
        return self._tracer


def extract_context(headers: Mapping[str, Any]) -> Context | None:
    """The trace context a message carries (`traceparent`, `tracestate`), or None.

    AMQP header values may arrive as bytes; a malformed `traceparent` counts as none.
    Names are matched in any case, as the writer matches them (`merged_headers`): a caller's
    own `Traceparent` stops the writer from storing the current span's, so it must be the one
    that is read here, or the message would carry no usable context at all. The lower-case
    spelling wins when both are there.
    Call only when opentelemetry-api is installed (a `TracerSource` gave a tracer).
    """
    found: dict[str, Any] = {}
    for name, value in headers.items():
        lower = name.lower() if isinstance(name, str) else None
        if lower in TRACE_HEADERS and (lower not in found or name == lower):
            found[lower] = value
    carrier = {}
    for name, value in found.items():
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if isinstance(value, str):
            carrier[name] = value
    if TRACEPARENT not in carrier:
        return None
    from opentelemetry import trace

    context = _w3c().extract(carrier)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def linked_span_context(headers: Mapping[str, Any]) -> SpanContext | None:
    """The span context a message carries, for a link; None when it carries none."""
    context = extract_context(headers)
    if context is None:
        return None
    from opentelemetry import trace

    return trace.get_current_span(context).get_span_context()


@contextlib.contextmanager
def consumer_span(
    tracer: Tracer,
    name: str,
    headers: Mapping[str, Any],
    attributes: Mapping[str, str | int],
) -> Iterator[Span]:
    """A current CONSUMER span, child of the context `headers` carry (a root without one).

    Handlers running inside see it as `opentelemetry.trace.get_current_span()`. An exception
    leaving the block is recorded on the span and sets its status to error.
    """
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    parent = extract_context(headers) or otel_context.Context()  # never the caller's span
    with tracer.start_as_current_span(
        name, context=parent, kind=trace.SpanKind.CONSUMER, attributes=dict(attributes)
    ) as span:
        yield span
