"""Trace context across the outbox (OpenTelemetry, optional: `outbox-relay[otel]`).

The writer stores the W3C trace context of the span current at `write()` (or at `record()` for
an aggregate) in the event's headers, as `traceparent` and `tracestate`; the relay publishes
event headers unchanged as AMQP headers.

Why W3C TraceContext explicitly rather than the globally configured propagator: the context
is read by other processes (the relay, every consumer group) that may be configured with
another propagator, possibly much later. A fixed, documented format is the contract between
them. The global propagator usually also injects `baggage`, which would then be stored in the
outbox table and its retention: application data we should not copy into a durable row unasked.

Why nothing is imported without OpenTelemetry: the writer looks for `opentelemetry.trace` in
`sys.modules` and never imports it. A span can only be current once that module is loaded (it
owns the context key that holds the current span), so an application that never loaded it has
no trace context to store.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from outbox.event import Event

if TYPE_CHECKING:
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
    if trace is None:  # never loaded: no span can be current (see the module docstring)
        return {}
    if not trace.get_current_span().get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    _w3c().inject(carrier)
    return carrier


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
