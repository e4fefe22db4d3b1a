"""Trace context for upstream calls, without importing OpenTelemetry.

The tracing listener (`instrumentation.tracing`, loaded only when tracing is on) sets the W3C
`traceparent`/`tracestate` of the model attempt being made; providers add `upstream_headers()`
to their request. With tracing off this is one ContextVar read returning an empty mapping.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType

NO_HEADERS: Mapping[str, str] = MappingProxyType({})
attempt_headers: ContextVar[Mapping[str, str]] = ContextVar(
    "rom_agent_attempt_headers", default=NO_HEADERS
)


def upstream_headers() -> Mapping[str, str]:
    """Headers that carry the current attempt's trace context to the provider (or none)."""
    return attempt_headers.get()


def with_trace_headers(headers: Mapping[str, str] | None) -> Mapping[str, str] | None:
    """`headers` plus the current attempt's trace context, if tracing put one there."""
    extra = attempt_headers.get()
    if not extra:
        return headers
    return {**headers, **extra} if headers else extra


def tracing_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Tracing is on when an OTLP endpoint is configured (the standard OTEL_* variables)."""
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
