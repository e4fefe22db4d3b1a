"""Fleet shared state: the Redis client's breaker (fakeredis), and two replicas in this process
against the real PostgreSQL and Redis (flag replication, registry, Redis unreachable)."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import fakeredis
import httpx
import pytest

from rom_agent.fleet.shared_state import FAILURES_TO_OPEN, SharedState, SharedStateDown
from tests.server import free_port, isolated_settings, running_app

TOKEN = secrets.token_urlsafe(32)
AUTH = {"X-Admin-Token": TOKEN}


# ---------------------------------------------------------------------- the client's breaker


async def test_failures_open_the_breaker_and_a_probe_closes_it() -> None:
    server = fakeredis.FakeServer()
    shared = SharedState(
        "redis://unused", client=fakeredis.FakeAsyncRedis(server=server), on_error=lambda op: None
    )
    changes: list[bool] = []
    shared.on_change(changes.append)
    assert await shared.call("set", lambda r: r.set("k", "v")) is True
    server.connected = False
    for _ in range(FAILURES_TO_OPEN):
        with pytest.raises(SharedStateDown):
            await shared.call("get", lambda r: r.get("k"))
    assert shared.up is False and changes == [False]
    server.connected = True
    calls = 0

    async def counted(redis: object) -> None:
        nonlocal calls
        calls += 1

    with pytest.raises(SharedStateDown):  # open: fails without touching Redis
        await shared.call("get", counted)
    assert calls == 0
    assert await shared.probe_once() is True
    assert shared.up is True and changes == [False, True]
    assert await shared.call("get", lambda r: r.get("k")) == b"v"


async def test_one_failure_alone_does_not_open_it() -> None:
    server = fakeredis.FakeServer()
    shared = SharedState("redis://unused", client=fakeredis.FakeAsyncRedis(server=server))
    server.connected = False
    with pytest.raises(SharedStateDown):
        await shared.call("get", lambda r: r.get("k"))
    server.connected = True
    assert await shared.call("get", lambda r: r.get("k")) is None
    server.connected = False
    with pytest.raises(SharedStateDown):
        await shared.call("get", lambda r: r.get("k"))
    assert shared.up is True  # the success in between reset the count


async def test_a_stalled_redis_costs_one_timeout_not_a_hang() -> None:
    shared = SharedState("redis://unused", client=fakeredis.FakeAsyncRedis(), call_timeout_s=0.02)

    async def stalled(redis: object) -> None:
        await asyncio.sleep(3600)

    started = time.monotonic()
    with pytest.raises(SharedStateDown):
        await shared.call("stalled", stalled)
    assert time.monotonic() - started < 1  # bounded by the call timeout, not the stall


# ---------------------------------------------------------------------- real engines


def test_a_replica_starts_and_serves_with_redis_unreachable(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = isolated_settings(tmp_path, redis_url=dead, replica_id="lonely")
    with running_app(settings) as app, app.client() as http:
        assert http.post("/api/chat", json={"message": "hi"}).status_code == 200
        deadline = time.monotonic() + 5
        while app.services.fleet.shared_state_up and time.monotonic() < deadline:
            time.sleep(0.02)  # the probe loop runs every second; bounded precondition wait
        ready = http.get("/ready")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        assert ready.json()["checks"]["sharedState"]["up"] is False
        assert "fleet_shared_state_up 0.0" in http.get("/metrics").text
        assert http.post("/api/chat", json={"message": "still"}).status_code == 200


def test_two_replicas_share_flags_and_see_each_other(
    tmp_path: Path, pg_url: str, redis_url: str, key_prefix: str
) -> None:
    def settings(name: str) -> object:
        return isolated_settings(
            tmp_path / name,
            database_url=pg_url,
            redis_url=redis_url,
            fleet_key_prefix=key_prefix,
            replica_id=name,
            admin_token=TOKEN,
        )

    with (
        running_app(settings("one")) as one,
        running_app(settings("two")) as two,
        httpx.Client(base_url=one.url, headers=AUTH) as http,
    ):
        sync = two.services.fleet.flag_sync
        assert sync is not None
        deadline = time.monotonic() + 5
        while not sync.subscribed:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert http.patch("/admin/flags", json={"MAX_QUEUE": 7}).status_code == 200
        started = time.monotonic()
        while two.services.flags.current.max_queue != 7:
            assert time.monotonic() - started < 1.0, "not replicated within 1 s"
            time.sleep(0.005)
        assert two.services.flags.version == one.services.flags.version
        deadline = time.monotonic() + 5
        while len(http.get("/admin/fleet").json()["replicas"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        fleet = http.get("/admin/fleet").json()
        assert [r["id"] for r in fleet["replicas"]] == ["one", "two"]
        assert fleet["sharedState"]["up"] is True
        history = http.get("/admin/flags/history").json()
        assert history["entries"][0]["changes"]["MAX_QUEUE"]["new"] == 7


async def test_concurrent_timeouts_count_as_one_failure() -> None:
    shared = SharedState("redis://unused", client=fakeredis.FakeAsyncRedis(), call_timeout_s=0.01)

    async def stalled(redis: object) -> None:
        await asyncio.sleep(3600)

    async def attempt() -> None:
        with pytest.raises(SharedStateDown):
            await shared.call("stalled", stalled)

    await asyncio.gather(*(attempt() for _ in range(FAILURES_TO_OPEN + 2)))
    assert shared.up is True  # one busy moment, not an outage
    for _ in range(FAILURES_TO_OPEN - 1):  # failures one after another do count
        await attempt()
    assert shared.up is False
