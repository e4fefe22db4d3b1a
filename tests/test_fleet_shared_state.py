"""Fleet shared state: the Redis client's breaker (fakeredis), and two replicas in this process
against the real PostgreSQL and Redis (flag replication, registry, Redis unreachable)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import fakeredis
import httpx
import pytest

from rom_agent.fleet.shared_state import FAILURES_TO_OPEN, SharedState, SharedStateDown
from rom_agent.resilience.clock import FakeClock
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


# ---------------------------------------------------------------------- a stalled Redis
# No real timing below: a call's bound "expires" by its command raising TimeoutError (what the
# bound does), the others' bounds are an hour, and time is an injected clock.


def never(loop: asyncio.AbstractEventLoop) -> Callable[[object], Awaitable[None]]:
    """A Redis command that never answers (a SIGSTOPped server)."""

    async def command(redis: object) -> None:
        await loop.create_future()

    return command


async def timed_out(redis: object) -> None:
    raise TimeoutError  # the call's bound expired


async def yield_to_tasks() -> None:
    for _ in range(10):
        await asyncio.sleep(0)  # lets the loop run ready callbacks; no time passes


def stalling(server: fakeredis.FakeServer, clock: FakeClock) -> tuple[SharedState, list[str]]:
    errors: list[str] = []
    shared = SharedState(
        "redis://unused",
        client=fakeredis.FakeAsyncRedis(server=server),
        call_timeout_s=3600,  # nobody waits for their own bound in these tests
        on_error=errors.append,
        monotonic=clock.now,
    )
    return shared, errors


async def test_a_request_path_timeout_cuts_short_the_calls_in_flight_and_skips_the_next() -> None:
    server = fakeredis.FakeServer()
    shared, errors = stalling(server, FakeClock())
    loop = asyncio.get_running_loop()
    in_flight = [asyncio.ensure_future(shared.call("admission", never(loop))) for _ in range(3)]
    await yield_to_tasks()
    assert not any(call.done() for call in in_flight)
    with pytest.raises(SharedStateDown) as first:
        await shared.call("admission", timed_out)
    assert first.value.sent is True
    assert shared.suspect is True
    await yield_to_tasks()  # their hour-long bounds were moved to now
    for call in in_flight:
        with pytest.raises(SharedStateDown):
            call.result()
    calls = 0

    async def counted(redis: object) -> None:
        nonlocal calls
        calls += 1

    verdict = shared._verdict
    assert verdict is not None and not verdict.done()
    with pytest.raises(SharedStateDown) as skipped:  # no waiting behind a suspect Redis
        await shared.call("admission", counted)
    assert calls == 0 and skipped.value.sent is False
    assert errors == ["admission"] * 5  # the timeout, the three cut short, the skipped one
    # Redis answered the background ping: it was our own slowness, not an outage.
    assert await verdict is True
    assert shared.suspect is False and shared.up is True
    await shared.call("admission", counted)
    assert calls == 1


async def test_a_timeout_confirmed_by_the_background_ping_opens_the_breaker_at_once() -> None:
    server = fakeredis.FakeServer()
    clock = FakeClock()
    shared, _ = stalling(server, clock)
    changes: list[bool] = []
    shared.on_change(changes.append)
    server.connected = False  # the ping that decides gets no answer either
    with pytest.raises(SharedStateDown):
        await shared.call("admission", timed_out)
    verdict = shared._verdict
    assert verdict is not None and await verdict is False
    assert shared.up is False and changes == [False]  # one request paid, not FAILURES_TO_OPEN
    assert shared.snapshot()["breaker"] == "OPEN"
    server.connected = True
    clock.advance(1)
    assert await shared.probe_once() is True  # the periodic background probe closes it
    assert shared.up is True and shared.suspect is False and changes == [False, True]


async def test_concurrent_timeouts_count_as_one_failure() -> None:
    server = fakeredis.FakeServer()
    clock = FakeClock()
    shared, _ = stalling(server, clock)
    loop = asyncio.get_running_loop()

    async def attempt(command: Callable[[object], Awaitable[None]], **kwargs: bool) -> None:
        with pytest.raises(SharedStateDown):
            await shared.call("stalled", command, **kwargs)

    others = [asyncio.ensure_future(attempt(never(loop))) for _ in range(FAILURES_TO_OPEN + 1)]
    await yield_to_tasks()
    clock.advance(0.001)
    await attempt(timed_out)
    await asyncio.gather(*others)
    assert shared._verdict is not None and await shared._verdict is True
    assert shared.up is True  # one busy moment, not an outage
    for _ in range(FAILURES_TO_OPEN):  # background failures one after another do count
        clock.advance(0.001)
        await attempt(timed_out, background=True)
    assert shared.up is False


async def test_the_deadline_follows_redis_clock_as_sampled_by_the_probe() -> None:
    clock = FakeClock()
    shared, _ = stalling(fakeredis.FakeServer(), clock)
    assert shared.deadline_ms() == 0  # not sampled yet: no deadline
    assert await shared.probe_once() is True
    first = shared.deadline_ms()
    clock.advance(10)
    assert shared.deadline_ms() == pytest.approx(first + 10_000, abs=1)
    shared.forget_clock()
    assert shared.deadline_ms() == 0
