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

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
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
from rom_agent.instrumentation.series import (
    CounterSeries,
    HistogramCell,
    HistogramSeries,
    SeriesCollector,
)

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
        self.registry = CollectorRegistry(auto_describe=True)
        self.breaker_source: BreakerStates | None = None
        self.admission_source: AdmissionGauges | None = None
        labels_om = ("operation", "model")

        self.breaker_success = CounterSeries(
            "circuit_breaker_success", "Calls the breaker let through that succeeded", labels_om
        )
        self.breaker_failure = CounterSeries(
            "circuit_breaker_failure", "Calls counted as failures by the breaker", labels_om
        )
        self.breaker_rejected = CounterSeries(
            "circuit_breaker_rejected",
            "Calls rejected by an OPEN or saturated HALF_OPEN breaker",
            labels_om,
        )
        self._breaker_calls = {
            "success": self.breaker_success,
            "failure": self.breaker_failure,
            "rejected": self.breaker_rejected,
        }
        self.breaker_transitions = CounterSeries(
            "circuit_breaker_transitions", "Breaker state transitions", (*labels_om, "from", "to")
        )

        self.fallback = CounterSeries(
            "model_fallback",
            "Moves from one model of the chain to the next",
            ("operation", "from", "to", "reason"),
        )
        self.fallback_attempt = CounterSeries(
            "model_fallback_attempt", "Models tried by the fallback chain", labels_om
        )
        self.fallback_success = CounterSeries(
            "model_fallback_success", "Requests answered, by the model that answered", labels_om
        )
        self.fallback_exhausted = CounterSeries(
            "model_fallback_exhausted",
            "Requests for which every model of the chain failed",
            ("operation",),
        )

        # bottleneck_running_total / bottleneck_queued_total share their base names with the
        # gauges bottleneck_running / bottleneck_queued, which prometheus-client refuses across
        # collectors; the live collector exposes them instead, from these two counts.
        self.admitted_count = 0
        self.queued_count = 0
        self.bottleneck_rejected = CounterSeries(
            "bottleneck_rejected", "Requests rejected by admission control", ("operation", "reason")
        )
        self.bottleneck_queue_wait = HistogramSeries(
            "bottleneck_queue_wait_seconds",
            "Time spent waiting for admission",
            buckets=_WAIT_BUCKETS,
        )
        self._queue_wait = self.bottleneck_queue_wait.cell()

        self.retry_attempts = CounterSeries(
            "retry_attempts", "Retries made, by reason", ("model", "reason")
        )
        self.retry_budget_exhausted = CounterSeries(
            "retry_budget_exhausted", "Retries refused by the retry budget", ("model",)
        )
        self.stream_continuation = CounterSeries(
            "stream_continuation",
            "Continuations of cut streams, by continuing model, strategy and outcome "
            "(started, succeeded, diverged, failed)",
            ("operation", "model", "strategy", "outcome"),
        )
        self.hedge = CounterSeries(
            "hedge",
            "First-token hedges of a slow model, by outcome "
            "(started, hedge_won, primary_won, budget_exhausted)",
            ("operation", "model", "outcome"),
        )
        self.guardrails_triggered = CounterSeries(
            "guardrails_triggered", "Guardrail events, by reason", ("reason",)
        )
        self.llm_duration = HistogramSeries(
            "llm_request_duration_seconds",
            "Provider attempt duration",
            ("model", "outcome"),
            buckets=LLM_BUCKETS,
        )
        self.llm_first_token = HistogramSeries(
            "llm_time_to_first_token_seconds",
            "Time from the start of a streamed attempt to its first content event",
            ("model",),
            buckets=LLM_BUCKETS[:-1],  # 50 ms to 60 s: FIRST_TOKEN_TIMEOUT_S stops longer waits
        )
        self.llm_tokens = CounterSeries("llm_tokens", "Tokens used", ("model", "direction"))
        self.http_requests = CounterSeries(
            "http_requests", "HTTP requests served", ("route", "status")
        )
        self.http_duration = HistogramSeries(
            "http_request_duration_seconds",
            "HTTP request duration",
            ("route",),
            buckets=_LATENCY_BUCKETS,
        )
        self.retry_after = HistogramSeries(
            "http_retry_after_seconds",
            "Retry-After given on 429/503 answers",
            ("route",),
            buckets=(1, 2, 5, 10, 30, 60, 120, 300),
        )
        # Every request's two events, their label tuples and cells found by one dict lookup.
        self._http_bound: dict[tuple[str, int], tuple[tuple[str, str], HistogramCell]] = {}
        self._attempt_bound: dict[tuple[str, str], HistogramCell] = {}

        r = self.registry
        r.register(
            SeriesCollector(
                [
                    self.breaker_success,
                    self.breaker_failure,
                    self.breaker_rejected,
                    self.breaker_transitions,
                    self.fallback,
                    self.fallback_attempt,
                    self.fallback_success,
                    self.fallback_exhausted,
                    self.bottleneck_rejected,
                    self.bottleneck_queue_wait,
                    self.retry_attempts,
                    self.retry_budget_exhausted,
                    self.stream_continuation,
                    self.hedge,
                    self.guardrails_triggered,
                    self.llm_duration,
                    self.llm_first_token,
                    self.llm_tokens,
                    self.http_requests,
                    self.http_duration,
                    self.retry_after,
                ]
            )
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
            self.breaker_success.seed(op, model)
            self.breaker_failure.seed(op, model)
            self.breaker_rejected.seed(op, model)
            self.fallback_attempt.seed(op, model)
            self.fallback_success.seed(op, model)
            self.retry_budget_exhausted.seed(model)
            for direction in ("input", "output"):
                self.llm_tokens.seed(model, direction)
        for current, following in itertools.pairwise(models):
            self.fallback.seed(op, current, following, "error")
        self.fallback_exhausted.seed(op)
        for reason in ("queue_full", "queue_timeout", "draining"):
            self.bottleneck_rejected.seed(op, reason)
        for reason in ("soft_limit", "hard_limit", "repetition"):
            self.guardrails_triggered.seed(reason)

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
        self._breaker_calls[event.outcome].inc((OPERATION, event.model))

    def _on_breaker_transition(self, event: BreakerTransitioned) -> None:
        self.breaker_transitions.inc((OPERATION, event.model, event.old, event.new))

    def _on_fallback_attempted(self, event: FallbackAttempted) -> None:
        self.fallback_attempt.inc((OPERATION, event.model))

    def _on_fallback_moved(self, event: FallbackMoved) -> None:
        self.fallback.inc((OPERATION, event.old, event.new, event.reason))

    def _on_fallback_succeeded(self, event: FallbackSucceeded) -> None:
        self.fallback_success.inc((OPERATION, event.model))

    def _on_fallback_exhausted(self, event: FallbackExhausted) -> None:
        self.fallback_exhausted.inc((OPERATION,))

    def _on_admitted(self, event: AdmissionGranted) -> None:
        self.admitted_count += 1
        if event.queued:
            self.queued_count += 1
        self._queue_wait.observe(event.waited_s)

    def _on_admission_rejected(self, event: AdmissionDenied) -> None:
        self.bottleneck_rejected.inc((OPERATION, event.reason))

    def _on_retry(self, event: RetryScheduled) -> None:
        self.retry_attempts.inc((event.model, event.reason))

    def _on_retry_budget_exhausted(self, event: RetryBudgetExhausted) -> None:
        self.retry_budget_exhausted.inc((event.model,))

    def _on_stream_continued(self, event: StreamContinued) -> None:
        self.stream_continuation.inc((OPERATION, event.model, event.strategy, event.outcome))

    def _on_hedge(self, event: HedgeSettled) -> None:
        self.hedge.inc((OPERATION, event.model, event.outcome))

    def _on_guardrail(self, event: GuardrailTriggered) -> None:
        self.guardrails_triggered.inc((event.reason,))

    def _on_attempt_finished(self, event: AttemptFinished) -> None:
        key = (event.model, event.outcome)
        cell = self._attempt_bound.get(key)
        if cell is None:
            cell = self._attempt_bound[key] = self.llm_duration.cell(*key)
        cell.observe(event.seconds)
        if event.outcome == "success":
            tokens = self.llm_tokens.values
            model = event.model
            tokens[model, "input"] = tokens.get((model, "input"), 0.0) + event.input_tokens
            tokens[model, "output"] = tokens.get((model, "output"), 0.0) + event.output_tokens

    def _on_first_token(self, event: FirstToken) -> None:
        self.llm_first_token.cell(event.model).observe(event.seconds)

    def _on_retry_after(self, event: RetryAfterGiven) -> None:
        self.retry_after.cell(event.route).observe(event.seconds)

    def _on_http_request(self, event: HttpRequestServed) -> None:
        key = (event.route, event.status)
        bound = self._http_bound.get(key)
        if bound is None:
            labels = (event.route, str(event.status))
            bound = self._http_bound[key] = (labels, self.http_duration.cell(event.route))
        labels, cell = bound
        counts = self.http_requests.values
        counts[labels] = counts.get(labels, 0.0) + 1.0
        cell.observe(event.seconds)
