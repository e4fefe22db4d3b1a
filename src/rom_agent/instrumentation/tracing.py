"""OpenTelemetry tracing: a listener on the events protocol plus one ASGI wrapper.

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set: then the app imports
this module, wraps its entry and subscribes the listener; otherwise nothing of OpenTelemetry is
imported and requests pay nothing (`tracing_requested` is the only check, made once at startup).

Spans:
* one SERVER span per HTTP request (`POST /api/chat`), child of the client's W3C `traceparent`
  when it sends one; carries `rom.request_id`, and the request's log lines carry `trace_id`;
* one CLIENT span per model attempt (`chat rom-sim-1`), following the OpenTelemetry GenAI
  semantic conventions (`gen_ai.operation.name`, `gen_ai.provider.name`, `gen_ai.request.model`,
  `gen_ai.response.model`, `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`,
  `error.type`) plus ours: `rom.retry.number`, `rom.retry.reason`, `rom.fallback.from`,
  `rom.fallback.to`, `rom.fallback.reason`, `rom.breaker.state`, `rom.hedge`,
  `rom.continuation.*`; its trace context goes to the provider (`propagation.upstream_headers`).
Admission wait, breaker rejections, retries and fallbacks are also attributes and events of the
request span, so a request that never reached a model still shows why.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rom_agent.domain import events as ev
from rom_agent.instrumentation import propagation

if TYPE_CHECKING:
    from rom_agent.services import Services

W3C = TraceContextTextMapPropagator()
_CARRIED = (b"traceparent", b"tracestate")


def provider_from_environment() -> TracerProvider:
    """OTLP over HTTP/protobuf, batched; endpoint, headers, service name from the standard
    OTEL_* variables (OTEL_SERVICE_NAME defaults to rom-agent here)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME", "rom-agent")
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


@dataclass(slots=True)
class _RequestTrace:
    span: Span
    context: Context
    request_id: str | None = None
    attempts: dict[str, int] = field(default_factory=dict)
    retry_reason: dict[str, str] = field(default_factory=dict)
    fallback: ev.FallbackMoved | None = None


_request: ContextVar[_RequestTrace | None] = ContextVar("rom_agent_request_trace", default=None)
_attempt: ContextVar[tuple[str, Span] | None] = ContextVar("rom_agent_attempt_span", default=None)


class TracingMiddleware:
    """Outermost ASGI layer: one SERVER span per HTTP request (see `Tracing.serve`)."""

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.tracing.serve(self.app, scope, receive, send)


class Tracing:
    """The events listener (`__call__`) and the request spans (`serve`) of one service."""

    def __init__(
        self,
        provider: TracerProvider,
        providers_by_model: Mapping[str, str],
        breaker_state: Callable[[str], str | None] = lambda model: None,
    ) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("rom_agent")
        self._providers_by_model = providers_by_model
        self._breaker_state = breaker_state

    # ------------------------------------------------------------------ requests (ASGI)

    async def serve(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        carrier = {
            name.decode(): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in _CARRIED
        }
        parent = W3C.extract(carrier) if carrier else None
        method = scope["method"]
        span = self._tracer.start_span(
            method,  # named after the route template once it is matched (never the raw path)
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        )
        context = trace.set_span_in_context(span)
        request = _RequestTrace(span, context)
        token = _request.set(request)
        ids = span.get_span_context()
        structlog.contextvars.bind_contextvars(
            trace_id=format(ids.trace_id, "032x"), span_id=format(ids.span_id, "016x")
        )
        status = 500

        async def send_traced(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name == b"x-request-id":
                        request.request_id = value.decode()
                        span.set_attribute("rom.request_id", request.request_id)
            await send(message)

        try:
            await app(scope, receive, send_traced)
        finally:
            route = scope.get("route")
            if route is not None:
                span.update_name(f"{method} {route.path}")
                span.set_attribute("http.route", route.path)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
                span.set_attribute("error.type", str(status))
            span.end()
            _request.reset(token)
            structlog.contextvars.unbind_contextvars("trace_id", "span_id")

    # ------------------------------------------------------------------ events (listener)

    def __call__(self, event: ev.Event) -> None:
        request = _request.get()
        if request is None:
            return  # not inside a traced request (a background probe)
        handler = _HANDLERS.get(type(event).__name__)
        if handler is not None:
            handler(self, request, event)

    def _attempt_started(self, request: _RequestTrace, event: ev.AttemptStarted) -> None:
        model = event.model
        number = request.attempts.get(model, 0)
        request.attempts[model] = number + 1
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": self._providers_by_model.get(model, "unknown"),
            "gen_ai.request.model": model,
            "rom.retry.number": number,
        }
        if request.request_id is None:  # set by the request-context middleware inside us
            request.request_id = structlog.contextvars.get_contextvars().get("request_id")
        if request.request_id:
            attributes["rom.request_id"] = request.request_id
        reason = request.retry_reason.pop(model, None)
        if reason is not None:
            attributes["rom.retry.reason"] = reason
        moved = request.fallback
        if moved is not None and moved.new == model:
            attributes["rom.fallback.from"] = moved.old
            attributes["rom.fallback.to"] = moved.new
            attributes["rom.fallback.reason"] = moved.reason
            request.fallback = None
        state = self._breaker_state(model)
        if state is not None:
            attributes["rom.breaker.state"] = state
        span = self._tracer.start_span(
            f"chat {model}", context=request.context, kind=SpanKind.CLIENT, attributes=attributes
        )
        _attempt.set((model, span))
        headers: dict[str, str] = {}
        W3C.inject(headers, context=trace.set_span_in_context(span))
        propagation.attempt_headers.set(headers)

    def _attempt_finished(self, request: _RequestTrace, event: ev.AttemptFinished) -> None:
        current = _attempt.get()
        if current is None or current[0] != event.model:
            return
        _attempt.set(None)
        propagation.attempt_headers.set(propagation.NO_HEADERS)
        model, span = current
        span.set_attribute("rom.attempt.outcome", event.outcome)
        if event.outcome == "success":
            span.set_attribute("gen_ai.response.model", model)
            span.set_attribute("gen_ai.usage.input_tokens", event.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", event.output_tokens)
        else:
            span.set_status(Status(StatusCode.ERROR, event.outcome))
            span.set_attribute("error.type", event.outcome)
        span.end()

    def _first_token(self, request: _RequestTrace, event: ev.FirstToken) -> None:
        current = _attempt.get()
        if current is not None and current[0] == event.model:
            current[1].set_attribute("rom.time_to_first_token_s", event.seconds)

    def _retry(self, request: _RequestTrace, event: ev.RetryScheduled) -> None:
        request.retry_reason[event.model] = event.reason
        request.span.add_event(
            "retry",
            {
                "rom.model": event.model,
                "rom.retry.reason": event.reason,
                "rom.retry.delay_s": event.delay_s,
            },
        )

    def _fallback(self, request: _RequestTrace, event: ev.FallbackMoved) -> None:
        request.fallback = event
        request.span.add_event(
            "fallback",
            {
                "rom.fallback.from": event.old,
                "rom.fallback.to": event.new,
                "rom.fallback.reason": event.reason,
            },
        )

    @staticmethod
    def _span_event(name: str, **fixed: Any) -> Callable[[Tracing, _RequestTrace, Any], None]:
        def handle(self: Tracing, request: _RequestTrace, event: Any) -> None:
            values = {f"rom.{key}": value for key, value in _fields(event).items()}
            request.span.add_event(name, {**values, **fixed})

        return handle

    def _admitted(self, request: _RequestTrace, event: Any) -> None:
        request.span.set_attribute("rom.admission.wait_s", event.waited_s)
        request.span.set_attribute("rom.admission.queued", event.queued)

    @staticmethod
    def _on_attempt(key: str) -> Callable[[Tracing, _RequestTrace, Any], None]:
        """Failover events (hedges, continuations): attributes of the current attempt span and
        an event on the request span."""

        def handle(self: Tracing, request: _RequestTrace, event: Any) -> None:
            values = _fields(event)
            current = _attempt.get()
            if current is not None:
                for name, value in values.items():
                    current[1].set_attribute(f"rom.{key}.{name}", value)
            request.span.add_event(key, {f"rom.{key}.{k}": v for k, v in values.items()})

        return handle


def _fields(event: Any) -> dict[str, Any]:
    return {
        name: getattr(event, name)
        for name in getattr(event, "__slots__", ())
        if isinstance(getattr(event, name), str | int | float | bool)
    }


def _breaker_rejected(self: Tracing, request: _RequestTrace, event: ev.BreakerCallRecorded) -> None:
    if event.outcome == "rejected":
        request.span.add_event("breaker rejected", {"rom.model": event.model})


# By class name, so events added later by other branches (hedges, continuations) are picked up
# without an import that would fail before they exist.
_HANDLERS: dict[str, Callable[[Tracing, _RequestTrace, Any], None]] = {
    "AttemptStarted": Tracing._attempt_started,
    "AttemptFinished": Tracing._attempt_finished,
    "FirstToken": Tracing._first_token,
    "RetryScheduled": Tracing._retry,
    "FallbackMoved": Tracing._fallback,
    "BreakerCallRecorded": _breaker_rejected,
    "RetryBudgetExhausted": Tracing._span_event("retry budget exhausted"),
    "FallbackExhausted": Tracing._span_event("fallback exhausted"),
    "AdmissionGranted": Tracing._admitted,
    "Admitted": Tracing._admitted,
    "AdmissionDenied": Tracing._span_event("admission rejected"),
    "AdmissionRejected": Tracing._span_event("admission rejected"),
    "GuardrailTriggered": Tracing._span_event("guardrail"),
    "StreamInterrupted": Tracing._span_event("stream interrupted"),
    "HedgeSettled": Tracing._on_attempt("hedge"),
    "StreamContinued": Tracing._on_attempt("continuation"),
}


def install(services: Services, provider: TracerProvider | None = None) -> Tracing:
    """Subscribe a tracing listener to `services.events`; the app adds `TracingMiddleware`."""

    def breaker_state(model: str) -> str | None:
        return services.breakers.get(model).observed_state().value

    tracing = Tracing(
        provider or provider_from_environment(),
        {ref.id: ref.provider for ref in services.chain},
        breaker_state=breaker_state,
    )
    kinds = [getattr(ev, name) for name in _HANDLERS if hasattr(ev, name)]
    services.events.subscribe(tracing, kinds)
    return tracing
