"""A short scripted workload that exercises every path the dashboard and the alerts watch:
answers, streams, retries, fallbacks, an exhausted chain, open breakers, queue rejections,
guardrails, 4xx. Used by the dashboard test (every metric name must be in a real scrape after
it) and by scripts/render_dashboard.py (docs/observability.md).

The server must run with ENABLE_FAULT_INJECTION, ENABLE_CIRCUIT_BREAKER, ENABLE_BOTTLENECK and
ENABLE_GUARDRAILS on (see WORKLOAD_ENV) and a chain of at least two simulator models.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence

import httpx

WORKLOAD_ENV = {
    "ENABLE_FAULT_INJECTION": "true",
    "ENABLE_CIRCUIT_BREAKER": "true",
    "ENABLE_BOTTLENECK": "true",
    "ENABLE_GUARDRAILS": "true",
    "CIRCUIT_BREAKER_THRESHOLD": "3",
    "CIRCUIT_BREAKER_COOLDOWN_S": "2",
    "MAX_CONCURRENT": "2",
    "MAX_QUEUE": "1",
    "QUEUE_TIMEOUT_S": "0.3",
    "MODEL_CHAIN": "simulator/rom-sim-1,simulator/rom-sim-2,simulator/rom-sim-3",
}


def chat(client: httpx.Client, text: str, fault: str | None = None) -> httpx.Response:
    headers = {"X-Fault": fault} if fault else {}
    return client.post("/api/chat", json={"message": text}, headers=headers)


def run_workload(url: str, models: Sequence[str], rounds: int = 1) -> dict[int, int]:
    """Returns how many answers of each status the workload got."""
    statuses: dict[int, int] = {}

    def count(response: httpx.Response) -> None:
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    first = models[0]
    with httpx.Client(base_url=url, timeout=30) as client:
        for index in range(rounds):
            count(chat(client, f"hello {index}"))
            with client.stream("POST", "/api/chat/stream", json={"message": "a stream"}) as r:
                r.read()
                count(r)
            count(
                client.post(
                    "/v1/chat/completions",
                    json={"model": first, "messages": [{"role": "user", "content": "hi"}]},
                )
            )
            count(client.get("/v1/models"))
            # A retry then a fallback: the first model answers 503 (retryable), twice.
            count(chat(client, "fall back", fault=f"status=503;models={first}"))
            # Rate limited: retried (reason rate_limited), then the next model answers.
            count(chat(client, "rate limited", fault=f"status=429;models={first}"))
            count(client.post("/api/chat", json={}))  # 400
            count(client.get("/no/such/route"))  # 404, route="unmatched"
        # More requests than MAX_CONCURRENT + MAX_QUEUE, each held 600 ms: some are shed.
        with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
            for response in pool.map(
                lambda i: chat(client, f"burst {i}", fault="delay_ms=600"), range(6)
            ):
                count(response)
        # Every model fails until the breakers open: 502 UPSTREAM_FAILED, then 503 CIRCUIT_OPEN.
        for _ in range(4):
            count(chat(client, "FORCE_ERROR everything"))
        count(chat(client, "after the breakers opened"))
    return statuses
