"""Prometheus instrumentation (SPEC §8): one listener on the events protocol.

The core emits `rom_agent.domain.events` events; `PrometheusMetrics` is subscribed to them and
is the only module that imports prometheus-client. Each app owns its registry, so tests can run
several apps side by side. State gauges (breaker state, bottleneck running/queued) are read from
their owners at scrape time by a custom collector, so `/metrics` always shows the live state —
an OPEN breaker whose cooldown has passed shows HALF_OPEN without any request arriving. The
scrape only observes: it never performs a transition (the breaker's own reads do that).

When `ENABLE_METRICS` is false nothing is recorded: the listener is unsubscribed (`listen`).
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

from rom_agent.config import Settings
from rom_agent.domain.events import (
    AdmissionDenied,
    AdmissionGranted,
    AttemptFinished,
    BreakerCallRecorded,
    BreakerTransitioned,
    Event,
    Events,
    FallbackAttempted,
    FallbackExhausted,
    FallbackMoved,
    FallbackSucceeded,
    FirstToken,
    GuardrailTriggered,
    HedgeSettled,
    HttpRequestServed,
    RetryAfterGiven,
    RetryBudgetExhausted,
    RetryScheduled,
    StreamContinued,
)
from rom_agent.flags import FlagStore

# `*_created` series double the exposition for no operator value.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus-client

OPERATION = "converse"

BREAKER_STATE_VALUE = {"CLOSED": 0, "HALF_OPEN": 1, "OPEN": 2}

# LLM calls take 50 ms (a cached or tiny answer) to minutes (long generations): buckets are
# dense where chat SLOs sit (0.5-10 s) and stop at 120 s, the longest REQUEST_TIMEOUT_S worth
# resolving. Each bucket is one series per label set, so there are 16, not 30 (see
# docs/observability.md, "Series count").
LLM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 30, 60, 120)
# HTTP adds the fast routes (/health, /metrics, rejections answered in microseconds).
_LATENCY_BUCKETS = (0.005, 0.025, *LLM_BUCKETS)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


Observe = Callable[[float], None]
Count = Callable[[float], None]


class BreakerStates(Protocol):
    def observed_states(self) -> Iterable[tuple[str, str]]:
        """(model id, state name) for every breaker as of now, without changing any."""
        ...


class AdmissionGauges(Protocol):
    @property
    def running(self) -> int: ...

    @property
    def queued(self) -> int: ...


class _LiveStateCollector(Collector):
    def __init__(self, metrics: PrometheusMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "circuit_breaker_state",
            "Circuit breaker state per model: 0 CLOSED, 1 HALF_OPEN, 2 OPEN",
            labels=["operation", "model", "state"],
        )
        source = self._metrics.breaker_source
        for model, name in source.observed_states() if source else ():
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


class PrometheusMetrics:
    """The Prometheus adapter: subscribe it to a service's `Events` (it is the listener)."""

    def __init__(self, enabled: Callable[[], bool], models: Sequence[str]) -> None:
        self._enabled = enabled
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # Every request's two events, pre-bound: the children's `inc`/`observe` by the event's
        # own fields — one dict lookup per event (no id-keyed tuple, `str(status)`, `_child`).
        self._http_bound: dict[tuple[str, int], tuple[Callable[[], None], Observe]] = {}
        self._attempt_bound: dict[tuple[str, str], tuple[Observe, Count, Count]] = {}
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
        self.stream_continuation = Counter(
            "stream_continuation",
            "Continuations of cut streams, by continuing model, strategy and outcome "
            "(started, succeeded, diverged, failed)",
            ["operation", "model", "strategy", "outcome"],
            registry=r,
        )
        self.hedge = Counter(
            "hedge",
            "First-token hedges of a slow model, by outcome "
            "(started, hedge_won, primary_won, budget_exhausted)",
            ["operation", "model", "outcome"],
            registry=r,
        )
        self.guardrails_triggered = Counter(
            "guardrails_triggered", "Guardrail events, by reason", ["reason"], registry=r
        )
        self.llm_duration = Histogram(
            "llm_request_duration_seconds",
            "Provider attempt duration",
            ["model", "outcome"],
            buckets=LLM_BUCKETS,
            registry=r,
        )
        self.llm_first_token = Histogram(
            "llm_time_to_first_token_seconds",
            "Time from the start of a streamed attempt to its first content event",
            ["model"],
            buckets=LLM_BUCKETS[:-1],  # 50 ms to 60 s: FIRST_TOKEN_TIMEOUT_S stops longer waits
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

        self.retry_after = Histogram(
            "http_retry_after_seconds",
            "Retry-After given on 429/503 answers",
            ["route"],
            buckets=(1, 2, 5, 10, 30, 60, 120, 300),
            registry=r,
        )

        r.register(_LiveStateCollector(self))
        self._seed(models)
        self._handlers: dict[type[Any], Callable[[Any], None]] = {
            BreakerCallRecorded: self._on_breaker_call,
            BreakerTransitioned: self._on_breaker_transition,
            FallbackAttempted: self._on_fallback_attempted,
            FallbackMoved: self._on_fallback_moved,
            FallbackSucceeded: self._on_fallback_succeeded,
            FallbackExhausted: self._on_fallback_exhausted,
            AdmissionGranted: self._on_admitted,
            AdmissionDenied: self._on_admission_rejected,
            RetryScheduled: self._on_retry,
            RetryBudgetExhausted: self._on_retry_budget_exhausted,
            StreamContinued: self._on_stream_continued,
            HedgeSettled: self._on_hedge,
            GuardrailTriggered: self._on_guardrail,
            AttemptFinished: self._on_attempt_finished,
            HttpRequestServed: self._on_http_request,
            FirstToken: self._on_first_token,
            RetryAfterGiven: self._on_retry_after,
        }

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
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ events

    def listen(self, events: Events, flags: FlagStore) -> None:
        """Record `events` while ENABLE_METRICS is true: subscribed (one typed handler per
        event type) only then, so with metrics off the core's events reach nobody."""
        removers: list[Callable[[], None]] = []

        def follow(settings: Settings) -> None:
            if settings.enable_metrics and not removers:
                removers.extend(
                    events.subscribe(handler, (kind,)) for kind, handler in self._handlers.items()
                )
            elif not settings.enable_metrics:
                while removers:
                    removers.pop()()

        follow(flags.current)
        flags.subscribe(follow)

    def __call__(self, event: Event) -> None:
        """Record any event, as an untyped listener (tests); `listen` routes them cheaper."""
        if not self._enabled():
            return
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    def _on_breaker_call(self, event: BreakerCallRecorded) -> None:
        if event.outcome == "success":
            metric = self.breaker_success
        elif event.outcome == "failure":
            metric = self.breaker_failure
        else:
            metric = self.breaker_rejected
        self._child(metric, OPERATION, event.model).inc()

    def _on_breaker_transition(self, event: BreakerTransitioned) -> None:
        self._child(self.breaker_transitions, OPERATION, event.model, event.old, event.new).inc()

    def _on_fallback_attempted(self, event: FallbackAttempted) -> None:
        self._child(self.fallback_attempt, OPERATION, event.model).inc()

    def _on_fallback_moved(self, event: FallbackMoved) -> None:
        self._child(self.fallback, OPERATION, event.old, event.new, event.reason).inc()

    def _on_fallback_succeeded(self, event: FallbackSucceeded) -> None:
        self._child(self.fallback_success, OPERATION, event.model).inc()

    def _on_fallback_exhausted(self, event: FallbackExhausted) -> None:
        self._child(self.fallback_exhausted, OPERATION).inc()

    def _on_admitted(self, event: AdmissionGranted) -> None:
        self.admitted_count += 1
        if event.queued:
            self.queued_count += 1
        self.bottleneck_queue_wait.observe(event.waited_s)

    def _on_admission_rejected(self, event: AdmissionDenied) -> None:
        self._child(self.bottleneck_rejected, OPERATION, event.reason).inc()

    def _on_retry(self, event: RetryScheduled) -> None:
        self._child(self.retry_attempts, event.model, event.reason).inc()

    def _on_retry_budget_exhausted(self, event: RetryBudgetExhausted) -> None:
        self._child(self.retry_budget_exhausted, event.model).inc()

    def _on_stream_continued(self, event: StreamContinued) -> None:
        labels = (OPERATION, event.model, event.strategy, event.outcome)
        self._child(self.stream_continuation, *labels).inc()

    def _on_hedge(self, event: HedgeSettled) -> None:
        self._child(self.hedge, OPERATION, event.model, event.outcome).inc()

    def _on_guardrail(self, event: GuardrailTriggered) -> None:
        self._child(self.guardrails_triggered, event.reason).inc()

    def _on_attempt_finished(self, event: AttemptFinished) -> None:
        key = (event.model, event.outcome)
        bound = self._attempt_bound.get(key)
        if bound is None:
            bound = self._attempt_bound[key] = (
                self._child(self.llm_duration, event.model, event.outcome).observe,
                self._child(self.llm_tokens, event.model, "input").inc,
                self._child(self.llm_tokens, event.model, "output").inc,
            )
        observe, count_input, count_output = bound
        observe(event.seconds)
        if event.outcome == "success":
            count_input(event.input_tokens)
            count_output(event.output_tokens)

    def _on_first_token(self, event: FirstToken) -> None:
        self._child(self.llm_first_token, event.model).observe(event.seconds)

    def _on_retry_after(self, event: RetryAfterGiven) -> None:
        self._child(self.retry_after, event.route).observe(event.seconds)

    def _on_http_request(self, event: HttpRequestServed) -> None:
        key = (event.route, event.status)
        bound = self._http_bound.get(key)
        if bound is None:
            bound = self._http_bound[key] = (
                self._child(self.http_requests, event.route, str(event.status)).inc,
                self._child(self.http_duration, event.route).observe,
            )
        count, observe = bound
        count()
        observe(event.seconds)
