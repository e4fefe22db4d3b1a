"""Writes deploy/grafana/rom-agent.json, the Grafana dashboard, from the panel list below.

    .venv/bin/python scripts/grafana_dashboard.py          # rewrite the JSON
    .venv/bin/python scripts/grafana_dashboard.py --check  # exit 1 if the JSON is stale

Kept as code so every panel has the same variables, units and layout, and the test
(tests/test_grafana_dashboard.py) can check the generated file is the committed one.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "rom-agent.json"

SEL = 'job="$job", instance=~"$instance"'
CHAT_ROUTES = 'route=~"/api/chat|/api/chat/stream|/v1/chat/completions"'
RATE = "$__rate_interval"


def quantiles(metric: str, by: str, extra: str = "") -> list[tuple[str, str]]:
    selector = f"{SEL}{', ' + extra if extra else ''}"
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) "
            f"(rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"p{round(q * 100)} {{{{{by}}}}}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    width: int = 12
    options: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)


BREAKER_STATES = {
    "type": "value",
    "options": {
        "0": {"text": "CLOSED", "color": "green", "index": 0},
        "1": {"text": "HALF_OPEN", "color": "yellow", "index": 1},
        "2": {"text": "OPEN", "color": "red", "index": 2},
    },
}

ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Traffic and outcomes",
        [
            Panel(
                "Requests per route and status",
                [
                    (
                        f"sum by (route, status) (rate(http_requests_total{{{SEL}}}[{RATE}]))",
                        "{{route}} {{status}}",
                    )
                ],
                "reqps",
            ),
            Panel(
                "Chat availability (SLO 99.5 %)",
                [
                    (
                        f'1 - (sum(rate(http_requests_total{{{SEL}, {CHAT_ROUTES}, status=~"5.."}}'
                        f"[{RATE}])) / "
                        f"sum(rate(http_requests_total{{{SEL}, {CHAT_ROUTES}}}[{RATE}])))",
                        "answered without 5xx",
                    )
                ],
                "percentunit",
                description="Share of chat requests not ending in a 5xx; the SLO alerts burn on "
                "the same ratio (deploy/prometheus/rom-agent-rules.yml).",
            ),
            Panel(
                "Answers per model",
                [
                    (
                        f"sum by (model) (rate(model_fallback_success_total{{{SEL}}}[{RATE}]))",
                        "{{model}}",
                    )
                ],
                "reqps",
            ),
            Panel(
                "Model attempts per outcome",
                [
                    (
                        "sum by (model, outcome) "
                        f"(rate(llm_request_duration_seconds_count{{{SEL}}}[{RATE}]))",
                        "{{model}} {{outcome}}",
                    )
                ],
                "reqps",
            ),
            Panel(
                "Tokens per model",
                [
                    (
                        f"sum by (model, direction) (rate(llm_tokens_total{{{SEL}}}[{RATE}]))",
                        "{{model}} {{direction}}",
                    )
                ],
                "short",
                width=24,
            ),
        ],
    ),
    (
        "Latency",
        [
            Panel(
                "Chat latency p50/p95/p99 per route",
                quantiles("http_request_duration_seconds", "route", CHAT_ROUTES),
                "s",
            ),
            Panel(
                "Time to first token p50/p95/p99 per model",
                quantiles("llm_time_to_first_token_seconds", "model"),
                "s",
            ),
            Panel(
                "Model attempt latency p50/p95/p99 (successes)",
                quantiles("llm_request_duration_seconds", "model", 'outcome="success"'),
                "s",
                width=24,
            ),
        ],
    ),
    (
        "Circuit breakers",
        [
            Panel(
                "Breaker state per model",
                [(f"max by (model) (circuit_breaker_state{{{SEL}}})", "{{model}}")],
                kind="state-timeline",
                width=24,
                defaults={"mappings": [BREAKER_STATES], "min": 0, "max": 2},
            ),
            Panel(
                "Breaker transitions",
                [
                    (
                        "sum by (model, from, to) "
                        f"(increase(circuit_breaker_transitions_total{{{SEL}}}[{RATE}]))",
                        "{{model}} {{from}} → {{to}}",
                    )
                ],
            ),
            Panel(
                "Breaker rejections and counted failures",
                [
                    (
                        f"sum by (model) (rate(circuit_breaker_rejected_total{{{SEL}}}[{RATE}]))",
                        "rejected {{model}}",
                    ),
                    (
                        f"sum by (model) (rate(circuit_breaker_failure_total{{{SEL}}}[{RATE}]))",
                        "failure {{model}}",
                    ),
                ],
                "reqps",
            ),
        ],
    ),
    (
        "Fallbacks, retries, continuations, hedges",
        [
            Panel(
                "Fallbacks (from → to, reason)",
                [
                    (
                        f"sum by (from, to, reason) (rate(model_fallback_total{{{SEL}}}[{RATE}]))",
                        "{{from}} → {{to}} ({{reason}})",
                    ),
                    (
                        f"sum(rate(model_fallback_exhausted_total{{{SEL}}}[{RATE}]))",
                        "chain exhausted",
                    ),
                ],
                "reqps",
            ),
            Panel(
                "Retries per model and reason",
                [
                    (
                        f"sum by (model, reason) (rate(retry_attempts_total{{{SEL}}}[{RATE}]))",
                        "{{model}} {{reason}}",
                    )
                ],
                "reqps",
            ),
            Panel(
                "Retry budget: retries per attempt, refusals",
                [
                    (
                        f"sum by (model) (rate(retry_attempts_total{{{SEL}}}[{RATE}])) / "
                        f"sum by (model) (rate(model_fallback_attempt_total{{{SEL}}}[{RATE}]))",
                        "retries per request {{model}}",
                    ),
                    (
                        f"sum by (model) (rate(retry_budget_exhausted_total{{{SEL}}}[{RATE}]))",
                        "refused by budget {{model}}",
                    ),
                ],
                description="Retries per request reaching the model, against "
                "RETRY_BUDGET_RATIO; refusals mean the budget is spent.",
            ),
            Panel(
                "Stream continuations (model, strategy, outcome)",
                [
                    (
                        "sum by (model, strategy, outcome) "
                        f"(rate(stream_continuation_total{{{SEL}}}[{RATE}]))",
                        "{{model}} {{strategy}} {{outcome}}",
                    )
                ],
                "reqps",
            ),
            Panel(
                "First-token hedges and hedge budget",
                [
                    (
                        f"sum by (model, outcome) (rate(hedge_total{{{SEL}}}[{RATE}]))",
                        "{{model}} {{outcome}}",
                    )
                ],
                "reqps",
                description="outcome=budget_exhausted: a hedge refused by the hedge budget.",
                width=24,
            ),
        ],
    ),
    (
        "Admission (bottleneck)",
        [
            Panel(
                "Running and queued vs limits",
                [
                    (f"sum by (instance) (bottleneck_running{{{SEL}}})", "running {{instance}}"),
                    (f"sum by (instance) (bottleneck_queued{{{SEL}}})", "queued {{instance}}"),
                    (
                        f"max by (instance) (bottleneck_max_running{{{SEL}}})",
                        "MAX_CONCURRENT {{instance}}",
                    ),
                    (
                        f"max by (instance) (bottleneck_max_queued{{{SEL}}})",
                        "MAX_QUEUE {{instance}}",
                    ),
                ],
            ),
            Panel(
                "Rejections by reason",
                [
                    (
                        f"sum by (reason) (rate(bottleneck_rejected_total{{{SEL}}}[{RATE}]))",
                        "{{reason}}",
                    )
                ],
                "reqps",
            ),
            Panel(
                "Queue wait p50/p95/p99",
                [
                    (
                        f"histogram_quantile({q}, sum by (le) "
                        f"(rate(bottleneck_queue_wait_seconds_bucket{{{SEL}}}[{RATE}])))",
                        f"p{round(q * 100)}",
                    )
                    for q in (0.5, 0.95, 0.99)
                ],
                "s",
            ),
            Panel(
                "Retry-After given (mean) and answers carrying it",
                [
                    (
                        f"sum by (route) (rate(http_retry_after_seconds_sum{{{SEL}}}[{RATE}])) / "
                        f"sum by (route) (rate(http_retry_after_seconds_count{{{SEL}}}[{RATE}]))",
                        "mean Retry-After (s) {{route}}",
                    ),
                    (
                        f"sum by (route) (rate(http_retry_after_seconds_count{{{SEL}}}[{RATE}]))",
                        "answers with Retry-After/s {{route}}",
                    ),
                ],
            ),
        ],
    ),
    (
        "Guardrails and flags",
        [
            Panel(
                "Guardrail triggers by reason",
                [
                    (
                        f"sum by (reason) (rate(guardrails_triggered_total{{{SEL}}}[{RATE}]))",
                        "{{reason}}",
                    )
                ],
                "reqps",
            ),
            Panel(
                "Feature flags on",
                [(f"max by (flag) (feature_flag_enabled{{{SEL}}})", "{{flag}}")],
                kind="state-timeline",
                defaults={
                    "mappings": [
                        {
                            "type": "value",
                            "options": {
                                "0": {"text": "off", "color": "transparent", "index": 0},
                                "1": {"text": "on", "color": "blue", "index": 1},
                            },
                        }
                    ]
                },
            ),
        ],
    ),
    (
        "Process",
        [
            Panel(
                "CPU",
                [(f"rate(process_cpu_seconds_total{{{SEL}}}[{RATE}])", "{{instance}}")],
                "percentunit",
                description="CPU seconds per second (1 = one core busy).",
            ),
            Panel(
                "Resident memory",
                [(f"process_resident_memory_bytes{{{SEL}}}", "{{instance}}")],
                "bytes",
            ),
            Panel(
                "Open file descriptors",
                [
                    (f"process_open_fds{{{SEL}}}", "open {{instance}}"),
                    (f"process_max_fds{{{SEL}}}", "limit {{instance}}"),
                ],
            ),
            Panel(
                "Event-loop lag",
                [(f"event_loop_lag_seconds{{{SEL}}}", "{{instance}}")],
                "s",
                description="How late the event loop woke a 0.5 s timer: a blocked loop delays "
                "every request.",
            ),
        ],
    ),
    (
        "Fleet (shared state)",
        [
            Panel(
                "Shared state healthy per replica",
                [(f"fleet_shared_state_up{{{SEL}}}", "{{instance}}")],
                kind="state-timeline",
                defaults={
                    "mappings": [
                        {
                            "type": "value",
                            "options": {
                                "0": {"text": "DEGRADED", "color": "red", "index": 0},
                                "1": {"text": "up", "color": "green", "index": 1},
                            },
                        }
                    ]
                },
            ),
            Panel(
                "Shared state errors, replicas, flag version",
                [
                    (
                        "sum by (instance, operation) "
                        f"(rate(fleet_shared_state_errors_total{{{SEL}}}[{RATE}]))",
                        "errors {{instance}} {{operation}}",
                    ),
                    (
                        f"max by (instance) (fleet_replicas{{{SEL}}})",
                        "replicas seen by {{instance}}",
                    ),
                    (
                        f"max by (instance) (fleet_flags_version{{{SEL}}})",
                        "flags version {{instance}}",
                    ),
                ],
            ),
        ],
    ),
]

# Panels whose metrics are not emitted on main yet are left out (the test requires every metric
# name in a real scrape). Empty once the failover work lands.
PENDING_METRICS: set[str] = set()


def uses_pending(panel: Panel) -> bool:
    return any(name in expr for expr, _ in panel.targets for name in PENDING_METRICS)


def datasource() -> dict[str, str]:
    return {"type": "prometheus", "uid": "${datasource}"}


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit, **panel.defaults}
    body: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": datasource(),
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": 8},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, **panel.options},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": datasource(),
                "expr": expr,
                "legendFormat": legend,
            }
            for i, (expr, legend) in enumerate(panel.targets)
        ],
    }
    return body


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    for title, row_panels in ROWS:
        kept = [panel for panel in row_panels if not uses_pending(panel)]
        if not kept:
            continue
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        x = 0
        for panel in kept:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(panel_json(panel, next_id, x, y))
            next_id += 1
            x += panel.width
        y += 8
    return {
        "title": "ROM Agent",
        "uid": "rom-agent",
        "description": "ROM Agent gateway: traffic, latency, breakers, fallbacks, admission, "
        "process, fleet (docs/observability.md).",
        "tags": ["rom-agent", "llm-gateway"],
        "timezone": "browser",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "graphTooltip": 1,
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "job",
                    "label": "Job",
                    "type": "query",
                    "datasource": datasource(),
                    "query": {"query": "label_values(http_requests_total, job)", "refId": "job"},
                    "definition": "label_values(http_requests_total, job)",
                    "current": {"text": "rom-agent", "value": "rom-agent"},
                    "refresh": 1,
                    "hide": 0,
                },
                {
                    "name": "instance",
                    "label": "Replica",
                    "type": "query",
                    "datasource": datasource(),
                    "query": {
                        "query": 'label_values(http_requests_total{job="$job"}, instance)',
                        "refId": "instance",
                    },
                    "definition": 'label_values(http_requests_total{job="$job"}, instance)',
                    "multi": True,
                    "includeAll": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                    "hide": 0,
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run scripts/grafana_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
