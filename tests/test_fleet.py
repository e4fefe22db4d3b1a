"""Fleet mode with real processes: three `rom-agent serve` replicas on free ports, one private
Redis, one PostgreSQL database. What must hold across replicas (issue 15): flags within 1 s,
the fleet-wide admission budget (also with a replica `kill -9`ed mid-burst), conversations
continued anywhere, every 200'd turn stored, and a stalled Redis costing no request."""

from __future__ import annotations

import asyncio
import gc
import math
import secrets
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.engines import create_database, drop_database, require
from tests.fleet_harness import PrivateRedis, Replica

TOKEN = secrets.token_urlsafe(32)
PREFIX = "fleettest:"
# Long enough that all 30 requests of a burst have arrived before the first one finishes, even
# on a busy 2-core machine (with 1 s, early answers freed slots for late arrivals).
SLOW = {"X-Fault": "delay_ms=2500"}


@dataclass
class Fleet:
    redis: PrivateRedis
    replicas: list[Replica]
    pg_url: str
    env: dict[str, str]
    workdir: Path

    def start(self, name: str) -> Replica:
        replica = Replica(name, self.env, self.workdir)
        replica.start(timeout=60)
        return replica

    def shared_state_log(self) -> str:
        """The replicas' log lines about Redis health (why a fallback happened)."""
        lines = [
            f"{r.name}: {line}"
            for r in self.replicas
            for line in httpx.get(r.url + "/metrics").text.splitlines()
            if line.startswith("fleet_shared_state_errors_total")
        ]
        for replica in self.replicas:
            for line in replica.log_path.read_text().splitlines():
                if "shared state" in line:
                    lines.append(f"{replica.name}: {line[:200]}")
        return "\n".join(lines)

    def admission_errors(self) -> int:
        """Admission calls that failed or timed out, summed over the replicas."""
        total = 0.0
        for replica in self.replicas:
            for line in httpx.get(replica.url + "/metrics").text.splitlines():
                if line.startswith('fleet_shared_state_errors_total{operation="admission"}'):
                    total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def redis_counts(self) -> tuple[int, int]:
        return (
            int(self.redis.cli("ZCARD", PREFIX + "adm:running")),
            int(self.redis.cli("ZCARD", PREFIX + "adm:queue")),
        )


def start_all(replicas: list[Replica]) -> None:
    errors: list[BaseException] = []

    def start(replica: Replica) -> None:
        try:
            replica.start(timeout=60)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    require("postgresql")
    workdir = tmp_path_factory.mktemp("fleet")
    redis = PrivateRedis(workdir)
    name, pg_url = create_database()
    env = {
        "DATABASE_URL": pg_url,
        "REDIS_URL": redis.url,
        "FLEET_KEY_PREFIX": PREFIX,
        "FLEET_LEASE_TTL_S": "3",
        "ADMIN_TOKEN": TOKEN,
        "ENABLE_BOTTLENECK": "true",
        "ADMISSION_SCOPE": "fleet",
        "MAX_CONCURRENT": "5",
        "MAX_QUEUE": "20",
        "ENABLE_FAULT_INJECTION": "true",
        "ENABLE_CIRCUIT_BREAKER": "true",
        "LOG_LEVEL": "warning",
    }
    replicas = [Replica(f"r{i}", env, workdir) for i in (1, 2, 3)]
    try:
        start_all(replicas)  # three replicas migrating one empty database at once
        deadline = time.monotonic() + 10
        while int(redis.cli("ZCARD", PREFIX + "replicas") or 0) < 3:
            assert time.monotonic() < deadline, "replicas did not register"
            time.sleep(0.05)
        yield Fleet(redis, replicas, pg_url, env, workdir)
    finally:
        for replica in replicas:
            if replica.process is not None and replica.process.poll() is None:
                replica.stop()
        redis.stop()
        drop_database(name)


def wait_for(condition: object, timeout: float, what: str) -> float:
    """Seconds until `condition()` held; fails after `timeout` (a bound, not a speed test)."""
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - started


def flag(replica: Replica, key: str) -> object:
    with replica.client(TOKEN) as http:
        return http.get("/admin/flags").json()["flags"][key]


def subscribers(fleet: Fleet) -> int:
    raw = fleet.redis.cli("PUBSUB", "NUMSUB", PREFIX + "events").splitlines()
    return int(raw[1]) if len(raw) > 1 else 0


# ---------------------------------------------------------------------- flags


def test_a_flag_patched_on_one_replica_is_in_force_on_the_others_within_1s(fleet: Fleet) -> None:
    one, two, three = fleet.replicas
    wait_for(lambda: subscribers(fleet) == 3, 10, "three subscribers")
    with one.client(TOKEN) as http:
        assert http.patch("/admin/flags", json={"RETRY_BUDGET_RATIO": 0.3}).status_code == 200
    for other in (two, three):
        wait_for(lambda o=other: flag(o, "RETRY_BUDGET_RATIO") == 0.3, 1.0, other.name)

    # The pub/sub connections are killed; each replica resubscribes (and re-reads) at once.
    assert int(fleet.redis.cli("CLIENT", "KILL", "TYPE", "pubsub")) == 3
    wait_for(lambda: subscribers(fleet) == 3, 5, "resubscribed")
    with two.client(TOKEN) as http:
        assert http.patch("/admin/flags", json={"RETRY_BUDGET_RATIO": 0.4}).status_code == 200
    for other in (one, three):
        wait_for(lambda o=other: flag(o, "RETRY_BUDGET_RATIO") == 0.4, 1.0, other.name)

    # A change published while nobody listens is lost by pub/sub: the version poll finds it.
    fleet.redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
    with three.client(TOKEN) as http:
        assert http.patch("/admin/flags", json={"RETRY_BUDGET_RATIO": 0.5}).status_code == 200
    for other in (one, two):
        wait_for(lambda o=other: flag(o, "RETRY_BUDGET_RATIO") == 0.5, 3.0, other.name)

    def listed() -> list[str]:
        with one.client(TOKEN) as http:
            return [r["id"] for r in http.get("/admin/fleet").json()["replicas"]]

    wait_for(lambda: listed() == ["r1", "r2", "r3"], 5, "three live replicas listed")


# ---------------------------------------------------------------------- breakers


def breaker(replica: Replica, model: str) -> dict[str, object]:
    with replica.client(TOKEN) as http:
        entries = http.get("/admin/breakers").json()["breakers"]
    return next(e for e in entries if e["model"] == model)


def test_a_breaker_forced_open_on_one_replica_rejects_on_the_others(fleet: Fleet) -> None:
    one, two, three = fleet.replicas
    with one.client(TOKEN) as http:
        forced = http.post("/admin/breakers/rom-sim-1/open")
    assert forced.status_code == 200 and forced.json()["override"]["replica"] == "r1"
    for other in (two, three):
        wait_for(lambda o=other: breaker(o, "rom-sim-1")["state"] == "OPEN", 1.0, other.name)
        shown = breaker(other, "rom-sim-1")
        assert shown["override"]["action"] == "open" and shown["override"]["replica"] == "r1"
        answer = httpx.post(other.url + "/api/chat", json={"message": "hi"}, timeout=30).json()
        assert answer["modelUsed"] == "rom-sim-2" and answer["fallbackUsed"] is True
    # Set again from r2 with an expiry: when it passes, every replica is back to normal.
    with two.client(TOKEN) as http:
        forced = http.post("/admin/breakers/rom-sim-1/open?expiresInS=1")
    assert forced.json()["override"]["replica"] == "r2"
    for replica in (one, two, three):
        wait_for(lambda r=replica: breaker(r, "rom-sim-1")["state"] == "CLOSED", 5, replica.name)
        assert breaker(replica, "rom-sim-1")["override"] is None


def test_a_breaker_opened_by_failures_makes_peers_probe_with_one_call(fleet: Fleet) -> None:
    one, two, three = fleet.replicas
    failing = {"X-Fault": "models=rom-sim-1"}
    for i in range(5):  # CIRCUIT_BREAKER_THRESHOLD consecutive failures of rom-sim-1 on r1
        answer = httpx.post(
            one.url + "/api/chat", json={"message": f"FORCE_ERROR {i}"}, headers=failing, timeout=30
        )
        assert answer.status_code == 200 and answer.json()["modelUsed"] == "rom-sim-2"
    assert breaker(one, "rom-sim-1")["state"] == "OPEN"
    for other in (two, three):
        wait_for(lambda o=other: breaker(o, "rom-sim-1")["state"] == "HALF_OPEN", 1.5, other.name)
        assert breaker(other, "rom-sim-1")["hint"]["replica"] == "r1"

    async def three_at_once(replica: Replica) -> list[str]:
        slow_probe = {"X-Fault": "delay_ms=1500;models=rom-sim-1"}
        async with httpx.AsyncClient(timeout=30) as http:
            answers = await asyncio.gather(
                *(
                    http.post(replica.url + "/api/chat", json={"message": "m"}, headers=slow_probe)
                    for _ in range(3)
                )
            )
        return sorted(a.json()["modelUsed"] for a in answers)

    # HALF_OPEN_MAX_CALLS=1: one probe reaches rom-sim-1, the others go straight to the fallback.
    assert asyncio.run(three_at_once(two)) == ["rom-sim-1", "rom-sim-2", "rom-sim-2"]
    assert breaker(two, "rom-sim-1")["state"] == "CLOSED"  # the probe succeeded
    with one.client(TOKEN) as http:
        assert http.post("/admin/breakers/rom-sim-1/reset").status_code == 200


# ---------------------------------------------------------------------- conversations


def test_a_conversation_continued_on_other_replicas_sends_the_whole_history(
    fleet: Fleet,
) -> None:
    def turns(replicas: list[Replica]) -> list[int]:
        conversation: str | None = None
        tokens = []
        for i, replica in enumerate(replicas):
            body = {"message": f"turn number {i}"}
            if conversation:
                body["conversationId"] = conversation
            answer = httpx.post(replica.url + "/api/chat", json=body, timeout=30).json()
            conversation = answer["conversationId"]
            tokens.append(answer["usage"]["inputTokens"])
        return tokens

    one = fleet.replicas[0]
    across = turns(fleet.replicas)
    alone = turns([one, one, one])
    assert across == alone  # the model saw the same history, wherever the turn landed
    assert across[0] < across[1] < across[2]


# ---------------------------------------------------------------------- admission


async def burst(
    replicas: list[Replica], count: int, slow: dict[str, str] = SLOW
) -> list[httpx.Response | Exception]:
    async with httpx.AsyncClient(timeout=60) as http:

        async def one(i: int) -> httpx.Response | Exception:
            replica = replicas[i % len(replicas)]
            try:
                return await http.post(
                    replica.url + "/api/chat", json={"message": f"burst {i}"}, headers=slow
                )
            except httpx.TransportError as exc:
                return exc

        return await asyncio.gather(*(one(i) for i in range(count)))


def gauges_back_to_zero(fleet: Fleet, replicas: list[Replica]) -> None:
    def idle() -> bool:
        for replica in replicas:
            with replica.client(TOKEN) as http:
                snapshot = http.get("/admin/bottleneck").json()
            if snapshot["running"] or snapshot["queued"]:
                return False
        return fleet.redis_counts() == (0, 0)

    wait_for(idle, 5, "gauges back to 0")


def test_fleet_admission_5_20_lets_exactly_25_of_30_through(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    errors_before = fleet.admission_errors()
    # 4 s: every arrival must land before the first answer frees a slot, even when this
    # machine is so busy that sending 30 requests takes seconds.
    results = asyncio.run(burst(fleet.replicas, 30, {"X-Fault": "delay_ms=4000"}))
    statuses = sorted(r.status_code for r in results if isinstance(r, httpx.Response))
    fallbacks = fleet.admission_errors() - errors_before
    if fallbacks == 0:
        assert statuses == [200] * 25 + [503] * 5, fleet.shared_state_log()
    else:
        # An admission call that missed its 20 ms bound (a machine too busy to read Redis's
        # answer in time) is decided by the local share instead: each such request may be
        # one more 200. Said loudly; on a quiet machine this branch does not run.
        with capsys.disabled():
            print(f"\nWARNING: {fallbacks} admission calls fell back to the local share")
        assert len(statuses) == 30 and statuses.count(200) <= 25 + fallbacks
        assert statuses.count(200) >= 25, fleet.shared_state_log()
    rejected = [r for r in results if isinstance(r, httpx.Response) and r.status_code == 503]
    for response in rejected:
        assert response.json()["code"] == "QUEUE_FULL"
        assert "queue full (20/20)" in response.json()["error"]
        assert int(response.headers["Retry-After"]) >= 1
    gauges_back_to_zero(fleet, fleet.replicas)


def test_a_replica_killed_mid_burst_loses_no_slot_and_no_200d_turn(fleet: Fleet) -> None:
    survivors, victim = fleet.replicas[:2], fleet.replicas[2]

    async def scenario() -> list[httpx.Response | Exception]:
        running = asyncio.ensure_future(burst(fleet.replicas, 30))
        await asyncio.sleep(0.5)  # let the burst be admitted and queued before the kill
        victim.kill()
        return await running

    results = asyncio.run(scenario())
    kept = [r for i, r in enumerate(results) if i % 3 != 2]  # requests sent to survivors
    assert all(isinstance(r, httpx.Response) for r in kept)
    codes = [
        r.json().get("code") for r in kept if isinstance(r, httpx.Response) and r.status_code != 200
    ]
    assert set(codes) <= {"QUEUE_FULL"}  # nobody waited out the queue timeout: no slot leaked
    # The victim's leases expired within the TTL; the budget is whole again.
    gauges_back_to_zero(fleet, survivors)
    again = asyncio.run(burst(survivors, 5))
    assert [r.status_code for r in again if isinstance(r, httpx.Response)] == [200] * 5

    # Every turn answered 200 by anyone (the victim included) is in PostgreSQL.
    answered = [
        r.json()["conversationId"]
        for r in results
        if isinstance(r, httpx.Response) and r.status_code == 200
    ]

    async def stored() -> set[str]:
        connection = await asyncpg.connect(fleet.pg_url)
        try:
            rows = await connection.fetch(
                "SELECT conversation_id FROM messages WHERE role = 'assistant'"
            )
        finally:
            await connection.close()
        return {row["conversation_id"] for row in rows}

    assert set(answered) <= asyncio.run(stored())
    fleet.replicas[2] = fleet.start("r3")  # back to three for the next test


# ---------------------------------------------------------------------- Redis stalled


def test_redis_stopped_for_5s_under_steady_load_fails_nothing(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    phases: dict[str, list[float]] = {"warm-up": [], "before": [], "during": [], "after": []}
    failures: list[str] = []
    phase = "warm-up"  # new connections everywhere: not the steady state being compared

    async def load(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=30) as http:

            async def worker(index: int) -> None:
                n = 0
                while not stop.is_set():
                    replica = fleet.replicas[(index + n) % 3]
                    n += 1
                    started = time.perf_counter()
                    try:
                        response = await http.post(replica.url + "/api/chat", json={"message": "x"})
                        ok = response.status_code == 200
                    except httpx.TransportError as exc:
                        ok, response = False, None
                        failures.append(type(exc).__name__)
                    elapsed = time.perf_counter() - started
                    if ok:
                        phases[phase].append(elapsed)
                    elif response is not None:
                        failures.append(f"{phase}: {response.status_code} {response.text[:80]}")
                    await asyncio.sleep(0.02)

            await asyncio.gather(*(worker(i) for i in range(3)))

    def ready(replica: Replica) -> str:
        response = httpx.get(replica.url + "/ready", timeout=5)
        assert response.status_code == 200
        return str(response.json()["status"])

    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=lambda: loop.run_until_complete(load(stop)))
    # This process's own garbage collection paused every request in flight by ~100 ms at
    # once (seen in "before" as well): latency measured here must be the replicas'.
    gc.collect()
    gc.disable()
    runner.start()
    try:
        time.sleep(1)
        phase = "before"
        time.sleep(3)
        phase = "during"
        fleet.redis.pause()
        try:
            time.sleep(2.5)
            assert all(ready(r) == "degraded" for r in fleet.replicas)
            time.sleep(2.5)
        finally:
            fleet.redis.resume()
        phase = "after"
        wait_for(lambda: all(ready(r) == "ready" for r in fleet.replicas), 5, "recovered")
        time.sleep(2)
    finally:
        loop.call_soon_threadsafe(stop.set)
        runner.join()
        loop.close()
        gc.enable()
    assert failures == []

    def p(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] * 1000

    with capsys.disabled():
        for name, values in phases.items():
            print(
                f"\nredis-stall {name}: {len(values)} requests, 0 failed, "
                f"p50 {statistics.median(values) * 1000:.1f} ms, p99 {p(values, 0.99):.1f} ms"
            )
    assert all(phases[name] for name in phases)
    # Issue 15: p99 added ≤ 20 ms. Only the calls in flight when Redis stopped (one or two per
    # replica) wait out the 20 ms bound; every later one skips the suspect Redis.
    added = p(phases["during"], 0.99) - p(phases["before"], 0.99)
    assert added <= 20, f"p99 added {added:.1f} ms during the stall"
    gauges_back_to_zero(fleet, fleet.replicas)
