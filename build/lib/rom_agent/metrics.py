"""Prometheus instrumentation (SPEC §8), kept in one module.

Layers report events through `Metrics` methods; nothing else imports prometheus-client. Each
app owns its registry, so tests can run several apps side by side. State gauges (breaker state,
bottleneck running/queued) are read from their owners at scrape time by a custom collector, so
`/metrics` always shows the live state — an OPEN breaker whose cooldown has passed shows
HALF_OPEN without any request arriving.

When `ENABLE_METRICS` is false nothing is recorded: every event method checks the flag first.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# `*_created` series double the exposition for no operator value.
disable_created_metrics()

OPERATION = "converse"

BREAKER_STATE_VALUE = {"CLOSED": 0, "HALF_OPEN": 1, "OPEN": 2}

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class BreakerStates(Protocol):
    def states(self) -> Iterable[tuple[str, str]]:
        """(model id, state name) for every breaker, evaluated now."""
        ...


class AdmissionGauges(Protocol):
    @property
    def running(self) -> int: ...

    @property
    def queued(self) -> int: ...


class _LiveStateCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "circuit_breaker_state",
            "Circuit breaker state per model: 0 CLOSED, 1 HALF_OPEN, 2 OPEN",
            labels=["operation", "model", "state"],
        )
        source = self._metrics.breaker_source
        for model, name in source.states() if source else ():
            state.add_metric([OPERATION, model, name], BREAKER_STATE_VALUE[name])
        yield state

        admitted = CounterMetricFamily(
            "bottleneck_running", "Requests admitted to run", labels=["operation"]
        )
        admitted.add_metric([OPERATION], self._metrics.admitted_count)
        waited = CounterMetricFamily(
            "bottleneck_queued", "Requests that had to wait in the queue", labels=["operation"]
        )
        waited.add_metric([OPERATION], self._metrics.queued_count)
        yield admitted
        yield waited

        admission = self._metrics.admission_source
        running = GaugeMetricFamily("bottleneck_running", "Requests running now")
        queued = GaugeMetricFamily("bottleneck_queued", "Requests waiting in the queue now")
        running.add_metric([], admission.running if admission else 0)
        queued.add_metric([], admission.queued if admission else 0)
        yield running
        yield queued


class Metrics:
    def __init__(self, enabled: Callable[[], bool], models: Sequence[str]) -> None:
        self._enabled = enabled
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.breaker_source: BreakerStates | None = None
        self.admission_source: AdmissionGauges | None = None
        r = self.registry
        labels_om = ["operation", "model"]

        self.breaker_success = Counter(
            "circuit_breaker_success",
            "Calls the breaker let through that succeeded",
            labels_om,
            registry=r,
        )
        self.breaker_failure = Counter(
            "circuit_breaker_failure",
            "Calls counted as failures by the breaker",
            labels_om,
            registry=r,
        )
        self.breaker_rejected = Counter(
            "circuit_breaker_rejected",
            "Calls rejected by an OPEN or saturated HALF_OPEN breaker",
            labels_om,
            registry=r,
        )
        self.breaker_transitions = Counter(
            "circuit_breaker_transitions",
            "Breaker state transitions",
            [*labels_om, "from", "to"],
            registry=r,
        )

        self.fallback = Counter(
            "model_fallback",
            "Moves from one model of the chain to the next",
            ["operation", "from", "to", "reason"],
            registry=r,
        )
        self.fallback_attempt = Counter(
            "model_fallback_attempt", "Models tried by the fallback chain", labels_om, registry=r
        )
        self.fallback_success = Counter(
            "model_fallback_success",
            "Requests answered, by the model that answered",
            labels_om,
            registry=r,
        )
        self.fallback_exhausted = Counter(
            "model_fallback_exhausted",
            "Requests for which every model of the chain failed",
            ["operation"],
            registry=r,
        )

        # bottleneck_running_total / bottleneck_queued_total share their base names with the
        # gauges bottleneck_running / bottleneck_queued, which prometheus-client refuses across
        # collectors; the live collector exposes them instead, from these two counts.
        self.admitted_count = 0
        self.queued_count = 0
        self.bottleneck_rejected = Counter(
            "bottleneck_rejected",
            "Requests rejected by admission control",
            ["operation", "reason"],
            registry=r,
        )
        self.bottleneck_queue_wait = Histogram(
            "bottleneck_queue_wait_seconds",
            "Time spent waiting for admission",
            buckets=_WAIT_BUCKETS,
            registry=r,
        )

        self.retry_attempts = Counter(
            "retry_attempts", "Retries made, by reason", ["model", "reason"], registry=r
        )
        self.retry_budget_exhausted = Counter(
            "retry_budget_exhausted", "Retries refused by the retry budget", ["model"], registry=r
        )
        self.guardrails_triggered = Counter(
            "guardrails_triggered", "Guardrail events, by reason", ["reason"], registry=r
        )
        self.llm_duration = Histogram(
            "llm_request_duration_seconds",
            "Provider attempt duration",
            ["model", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.llm_tokens = Counter("llm_tokens", "Tokens used", ["model", "direction"], registry=r)
        self.http_requests = Counter(
            "http_requests", "HTTP requests served", ["route", "status"], registry=r
        )
        self.http_duration = Histogram(
            "http_request_duration_seconds",
            "HTTP request duration",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

        r.register(_LiveStateCollector(self))
        self._seed(models)

    def _seed(self, models: Sequence[str]) -> None:
        """Create every series the guide greps, zero-valued, before the first request."""
        op = OPERATION
        for model in models:
            self.breaker_success.labels(op, model)
            self.breaker_failure.labels(op, model)
            self.breaker_rejected.labels(op, model)
            self.fallback_attempt.labels(op, model)
            self.fallback_success.labels(op, model)
            self.retry_budget_exhausted.labels(model)
            for direction in ("input", "output"):
                self.llm_tokens.labels(model, direction)
        for current, following in itertools.pairwise(models):
            self.fallback.labels(op, current, following, "error")
        self.fallback_exhausted.labels(op)
        for reason in ("queue_full", "queue_timeout", "draining"):
            self.bottleneck_rejected.labels(op, reason)
        for reason in ("soft_limit", "hard_limit", "repetition"):
            self.guardrails_triggered.labels(reason)

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, memoised: label sets are bounded (model ids from the
        config, route templates, reasons), and `labels()` takes a lock and builds keys on
        every call of the hot path."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # ------------------------------------------------------------------ exposition

    @property
    def enabled(self) -> bool:
        return self._enabled()

    def render(self) -> bytes:
        # Evaluate breaker states first: a due OPEN → HALF_OPEN transition is counted in
        # circuit_breaker_transitions_total, which is rendered before the state gauge.
        if self.breaker_source is not None:
            for _ in self.breaker_source.states():
                pass
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ events

    def breaker_outcome(self, model: str, outcome: str) -> None:
        """outcome: success | failure | rejected."""
        if not self._enabled():
            return
        if outcome == "success":
            self._child(self.breaker_success, OPERATION, model).inc()
        elif outcome == "failure":
            self._child(self.breaker_failure, OPERATION, model).inc()
        else:
            self._child(self.breaker_rejected, OPERATION, model).inc()

    def breaker_transition(self, model: str, old: str, new: str) -> None:
        if self._enabled():
            self._child(self.breaker_transitions, OPERATION, model, old, new).inc()

    def fallback_attempted(self, model: str) -> None:
        if self._enabled():
            self._child(self.fallback_attempt, OPERATION, model).inc()

    def fallback_moved(self, old: str, new: str, reason: str) -> None:
        if self._enabled():
            self._child(self.fallback, OPERATION, old, new, reason).inc()

    def fallback_succeeded(self, model: str) -> None:
        if self._enabled():
            self._child(self.fallback_success, OPERATION, model).inc()

    def fallback_chain_exhausted(self) -> None:
        if self._enabled():
            self._child(self.fallback_exhausted, OPERATION).inc()

    def admission_admitted(self, waited_s: float, queued: bool) -> None:
        if not self._enabled():
            return
        self.admitted_count += 1
        if queued:
            self.queued_count += 1
        self.bottleneck_queue_wait.observe(waited_s)

    def admission_rejected(self, reason: str) -> None:
        if self._enabled():
            self._child(self.bottleneck_rejected, OPERATION, reason).inc()

    def retry_made(self, model: str, reason: str) -> None:
        if self._enabled():
            self._child(self.retry_attempts, model, reason).inc()

    def retry_refused_by_budget(self, model: str) -> None:
        if self._enabled():
            self._child(self.retry_budget_exhausted, model).inc()

    def guardrail_triggered(self, reason: str) -> None:
        if self._enabled():
            self._child(self.guardrails_triggered, reason).inc()

    def llm_attempt(self, model: str, outcome: str, seconds: float) -> None:
        if self._enabled():
            self._child(self.llm_duration, model, outcome).observe(seconds)

    def tokens_used(self, model: str, input_tokens: int, output_tokens: int) -> None:
        if not self._enabled():
            return
        self._child(self.llm_tokens, model, "input").inc(input_tokens)
        self._child(self.llm_tokens, model, "output").inc(output_tokens)

    def http_request(self, route: str, status: int, seconds: float) -> None:
        if not self._enabled():
            return
        self._child(self.http_requests, route, str(status)).inc()
        self._child(self.http_duration, route).observe(seconds)
