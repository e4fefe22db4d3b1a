"""Metrics hygiene: runtime series (process, event-loop lag, flags, limits), LLM-sized latency
buckets, and a series count that stays bounded whatever the traffic."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from rom_agent.instrumentation.runtime import EventLoopLag
from rom_agent.resilience.clock import FakeClock
from tests.server import ServiceProcess
from tests.workload import WORKLOAD_ENV, run_workload

MODELS = ("rom-sim-1", "rom-sim-2", "rom-sim-3")


async def test_event_loop_lag_is_how_late_the_probe_woke() -> None:
    clock = FakeClock(autoadvance=False)
    lag = EventLoopLag(clock, interval_s=0.5)
    lag.start()
    await asyncio.sleep(0)  # the probe is asleep until 0.5 s
    clock.advance(0.8)  # woken 0.3 s late, as if the loop had been blocked
    await asyncio.sleep(0)
    assert abs(lag.last_s - 0.3) < 1e-9
    await asyncio.sleep(0)
    clock.advance(0.5)  # on time
    await asyncio.sleep(0)
    assert lag.last_s == 0.0
    await lag.stop()


def series(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name → {labels: value} of a /metrics exposition."""
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            found.setdefault(sample.name, {})[labels] = sample.value
    return found


def test_scrape_has_runtime_series_and_a_bounded_series_count(tmp_path: Path) -> None:
    env = {
        **WORKLOAD_ENV,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "KB_DIR": str(tmp_path / "kb"),
        "LOG_LEVEL": "warning",
    }
    service = ServiceProcess(env, tmp_path).start()
    try:
        at_start = series(httpx.get(service.url + "/metrics").text)
        statuses = run_workload(service.url, MODELS)
        after_one = series(httpx.get(service.url + "/metrics").text)
        run_workload(service.url, MODELS, rounds=3)  # new texts, same paths: no new series
        after_more = series(httpx.get(service.url + "/metrics").text)
    finally:
        service.stop()
    assert {200, 400, 404, 502, 503} <= set(statuses), statuses

    # Process collector and our runtime gauges, live.
    assert after_one["process_resident_memory_bytes"][()] > 10_000_000
    assert after_one["process_open_fds"][()] > 3
    assert after_one["process_cpu_seconds_total"][()] > 0
    assert ("event_loop_lag_seconds") in after_one
    flags = after_one["feature_flag_enabled"]
    assert flags[(("flag", "ENABLE_FAULT_INJECTION"),)] == 1
    assert flags[(("flag", "ENABLE_METRICS"),)] == 1
    assert after_one["bottleneck_max_running"][()] == 2
    assert after_one["bottleneck_max_queued"][()] == 1

    # Buckets sized for LLM calls: 50 ms to 120 s, then +Inf.
    les = sorted(
        float(dict(labels)["le"])
        for labels in after_one["llm_request_duration_seconds_bucket"]
        if dict(labels)["model"] == "rom-sim-1" and dict(labels)["outcome"] == "success"
    )
    assert les[0] == 0.05 and les[-2] == 120 and les[-1] == float("inf")

    # Bounded cardinality: user input never makes a series, so more traffic adds none.
    count_start = sum(len(v) for v in at_start.values())
    count_one = sum(len(v) for v in after_one.values())
    count_more = sum(len(v) for v in after_more.values())
    print(
        f"\nseries with a 3-model chain: {count_start} at start, {count_one} after the workload,"
        f" {count_more} after 3 more rounds"
    )
    added = {
        (name, labels)
        for name, by_labels in after_more.items()
        for labels in by_labels
        if labels not in after_one.get(name, {})
    }
    print("added by more rounds:", sorted(added))
    values = {
        value for _, by_labels in after_more.items() for labels in by_labels for _, value in labels
    }
    assert not {
        value for value in values if "hello" in value or "burst" in value or "/no/" in value
    }
    assert count_more < 400
    routes = {dict(labels)["route"] for labels in after_one["http_requests_total"]}
    assert "/no/such/route" not in routes and "unmatched" in routes
