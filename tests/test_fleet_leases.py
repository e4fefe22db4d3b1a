"""Fleet-wide admission leases (Lua on fakeredis): the budget holds across replicas, FIFO
promotion, lost promotion messages, expired leases of a dead replica, timeouts, fallback."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import fakeredis
import orjson
import pytest

from rom_agent.config import Settings
from rom_agent.flags import FlagStore
from rom_agent.fleet.leases import FleetAdmission, FleetWaiter
from rom_agent.fleet.shared_state import FAILURES_TO_OPEN, SharedState
from rom_agent.resilience.admission_permits import AdmissionRejected, Permit
from rom_agent.resilience.bottleneck import Bottleneck
from rom_agent.resilience.clock import FakeClock

PREFIX = "t:"


class Replica:
    def __init__(
        self,
        name: str,
        server: fakeredis.FakeServer,
        monotonic: Callable[[], float] | None = None,
        **limits: object,
    ) -> None:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            enable_bottleneck=True,
            redis_url="redis://unused",
            admission_scope="fleet",
            **limits,
        )
        self.flags = FlagStore(settings)
        self.clock = FakeClock(autoadvance=False)
        self.client = fakeredis.FakeAsyncRedis(server=server)
        self.shared = SharedState(
            "redis://unused",
            prefix=PREFIX,
            client=self.client,
            monotonic=monotonic or self.clock.now,
        )
        self.bottleneck = Bottleneck(self.flags, self.clock)
        self.admission = FleetAdmission(self.shared, name, self.flags, self.clock, lease_ttl_s=10)
        self.admission.bottleneck = self.bottleneck
        self.bottleneck.remote = self.admission

    async def acquire(self) -> Permit | FleetWaiter | None:
        return await self.admission.try_acquire(self.bottleneck.admit_remote)


async def fleet_counts(server: fakeredis.FakeServer) -> tuple[int, int]:
    redis = fakeredis.FakeAsyncRedis(server=server)
    return await redis.zcard(PREFIX + "adm:running"), await redis.zcard(PREFIX + "adm:queue")


async def drain_background(*replicas: Replica) -> None:
    for _ in range(20):
        await asyncio.sleep(0)
    for replica in replicas:
        for task in list(replica.admission._background):
            await task


async def test_the_budget_is_fleet_wide_and_the_overflow_is_rejected_with_fleet_numbers() -> None:
    server = fakeredis.FakeServer()
    replicas = [Replica(f"r{i}", server, max_concurrent=5, max_queue=20) for i in range(3)]
    outcomes = [await replicas[i % 3].acquire() for i in range(25)]
    assert sum(isinstance(o, Permit) for o in outcomes) == 5
    assert sum(isinstance(o, FleetWaiter) for o in outcomes) == 20
    with pytest.raises(AdmissionRejected) as rejected:
        await replicas[0].acquire()
    assert rejected.value.code == "QUEUE_FULL"
    assert str(rejected.value) == "Service temporarily unavailable: queue full (20/20)"
    assert rejected.value.retry_after_s is not None and rejected.value.retry_after_s >= 1
    assert await fleet_counts(server) == (5, 20)
    assert [r.bottleneck.running for r in replicas] == [2, 2, 1]
    for outcome in outcomes:
        if isinstance(outcome, FleetWaiter):
            replicas[int(outcome.lease.split(":")[0][1])].admission.abandon(outcome)
        else:
            assert isinstance(outcome, Permit)
            outcome.release()
    await drain_background(*replicas)
    assert await fleet_counts(server) == (0, 0)
    assert [r.bottleneck.running for r in replicas] == [0, 0, 0]
    assert [r.bottleneck.queued for r in replicas] == [0, 0, 0]


async def test_a_release_promotes_the_queue_head_and_publishes_it() -> None:
    server = fakeredis.FakeServer()
    one, two = Replica("a", server, max_concurrent=1), Replica("b", server, max_concurrent=1)
    listener = fakeredis.FakeAsyncRedis(server=server).pubsub(ignore_subscribe_messages=True)
    await listener.subscribe(PREFIX + "events")
    first = await one.acquire()
    second = await two.acquire()
    third = await one.acquire()
    assert isinstance(first, Permit)
    assert isinstance(second, FleetWaiter) and isinstance(third, FleetWaiter)
    first.release()
    await drain_background(one)
    message = None
    for _ in range(5):  # the first read returns the (ignored) subscribe confirmation as None
        message = message or await listener.get_message(timeout=0.1)
    assert message is not None
    event = orjson.loads(message["data"])
    assert event == {"kind": "admission", "promoted": [second.lease]}  # FIFO: b before a
    two.admission.on_promoted(event)
    permit = await second.future
    assert permit.lease == second.lease and permit.waited_s == 0.0
    assert not third.future.done()
    permit.release()
    await drain_background(two)
    # Suppose this promotion message is lost: the owner's periodic renewal finds it.
    assert not third.future.done()
    await one.admission.renew()
    assert (await third.future).lease == third.lease
    await listener.aclose()


async def test_leases_of_a_replica_that_died_expire_and_free_their_slots() -> None:
    server = fakeredis.FakeServer()
    dead, alive = (
        Replica("dead", server, max_concurrent=2),
        Replica("alive", server, max_concurrent=2),
    )
    assert isinstance(await dead.acquire(), Permit)
    assert isinstance(await dead.acquire(), Permit)
    waiter = await alive.acquire()
    assert isinstance(waiter, FleetWaiter)
    # `kill -9`: nobody renews; the leases' expiry (Redis clock) passes.
    redis = fakeredis.FakeAsyncRedis(server=server)
    for lease in await redis.zrange(PREFIX + "adm:running", 0, -1):
        await redis.zadd(PREFIX + "adm:running", {lease: 1})
    await alive.admission.renew()  # any script call sweeps and promotes
    assert (await waiter.future).lease == waiter.lease
    assert await fleet_counts(server) == (1, 0)


async def test_a_queue_timeout_rejects_and_gives_the_place_back() -> None:
    server = fakeredis.FakeServer()
    replica = Replica("a", server, max_concurrent=1, queue_timeout_s=5)
    permit = await replica.acquire()
    waiter = await replica.acquire()
    assert isinstance(permit, Permit) and isinstance(waiter, FleetWaiter)
    await asyncio.sleep(0)  # the timer task starts sleeping on the fake clock
    replica.clock.advance(5)
    with pytest.raises(AdmissionRejected) as rejected:
        await waiter.future
    assert rejected.value.code == "QUEUE_TIMEOUT"
    await drain_background(replica)
    assert await fleet_counts(server) == (1, 0)


async def test_with_redis_down_admission_falls_back_to_a_local_share() -> None:
    server = fakeredis.FakeServer()
    replica = Replica("a", server, max_concurrent=5, max_queue=20)
    replica.bottleneck.replica_count = lambda: 3
    server.connected = False
    for _ in range(FAILURES_TO_OPEN):
        assert await replica.acquire() is None  # the caller must use the local path
    assert replica.bottleneck.remote_gate() is None  # breaker open: no more Redis calls
    local = [replica.bottleneck.try_acquire() for _ in range(2)]
    assert all(isinstance(p, Permit) for p in local)
    assert replica.bottleneck.try_acquire() is None  # ceil(5/3) = 2 running, then queue
    waiters = [replica.bottleneck.enqueue() for _ in range(7)]  # ceil(20/3) = 7 queued
    with pytest.raises(AdmissionRejected) as rejected:
        replica.bottleneck.try_acquire()
    assert str(rejected.value) == "Service temporarily unavailable: queue full (7/7)"
    for waiter in waiters:
        replica.bottleneck.abandon(waiter)


async def test_an_admission_call_reaching_redis_after_its_deadline_takes_nothing() -> None:
    """After a stall Redis runs every buffered call; those whose callers already fell back to
    the local share must not take slots (they queued ahead of the fleet's next requests)."""
    server = fakeredis.FakeServer()
    now = [1000.0]
    replica = Replica("a", server, lambda: now[0], max_concurrent=5, max_queue=20)
    assert await replica.acquire() is not None  # no clock sample yet: no deadline
    assert await replica.shared.probe_once() is True  # samples Redis's clock at our t=1000
    assert isinstance(await replica.acquire(), Permit)  # well within its deadline
    now[0] -= 60  # sent 60 s before the sample: it reaches Redis long after its deadline
    assert await replica.acquire() is None  # the caller uses the local share
    assert await fleet_counts(server) == (2, 0)  # the late call took nothing
    assert replica.shared.deadline_ms() == 0  # our clock estimate was off: sampled again
    await drain_background(replica)
    assert replica.admission._unreleased == set()  # nothing to give back either


async def test_stress_the_fleet_budget_never_exceeds_the_limit() -> None:
    server = fakeredis.FakeServer()
    limit = 4
    replicas = [Replica(f"r{i}", server, max_concurrent=limit, max_queue=1000) for i in range(3)]
    rng = random.Random(7)
    running = 0
    peak = 0
    done = 0

    listener = fakeredis.FakeAsyncRedis(server=server).pubsub(ignore_subscribe_messages=True)
    await listener.subscribe(PREFIX + "events")

    async def deliver() -> None:  # the fleet channel: every replica sees every promotion
        while True:
            message = await listener.get_message(timeout=0.01)
            if message is not None:
                for replica in replicas:
                    replica.admission.on_promoted(orjson.loads(message["data"]))

    delivery = asyncio.create_task(deliver())

    async def request(replica: Replica) -> None:
        nonlocal running, peak, done
        outcome = await replica.acquire()
        if isinstance(outcome, FleetWaiter):
            permit = await outcome.future
        else:
            assert isinstance(outcome, Permit)
            permit = outcome
        running += 1
        peak = max(peak, running)
        for _ in range(rng.randint(0, 5)):
            await asyncio.sleep(0)
        running -= 1
        permit.release()
        done += 1

    await asyncio.gather(*(request(replicas[rng.randrange(3)]) for _ in range(120)))
    await drain_background(*replicas)
    delivery.cancel()
    await listener.aclose()
    assert done == 120
    assert peak == limit  # reached, never exceeded
    assert await fleet_counts(server) == (0, 0)
