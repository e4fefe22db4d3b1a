"""Fleet mode's composition: the Redis client, flag replication and the replica registry.

Built without I/O by `create_services`; `start()` runs inside the lifespan and never waits for
Redis (a replica must start, and serve, while Redis is down). Without REDIS_URL only the flag
version poll runs (when the database is PostgreSQL, which is what makes flags shared at all).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rom_agent import __version__
from rom_agent.fleet.breaker_sync import BreakerSync
from rom_agent.fleet.flag_sync import FlagSync
from rom_agent.fleet.leases import FleetAdmission
from rom_agent.fleet.replicas import ReplicaRegistry
from rom_agent.fleet.shared_state import SharedState, SharedStateDown
from rom_agent.logs import get_logger
from rom_agent.resilience.clock import Clock, SystemClock

if TYPE_CHECKING:
    from rom_agent.config import Settings
    from rom_agent.flags import FlagStore
    from rom_agent.instrumentation.prometheus import PrometheusMetrics
    from rom_agent.resilience.bottleneck import Bottleneck
    from rom_agent.resilience.breaker import BreakerRegistry
    from rom_agent.store.backend import StoreBackend

log = get_logger("rom_agent.fleet")


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Fleet:
    def __init__(
        self,
        settings: Settings,
        flags: FlagStore,
        bottleneck: Bottleneck,
        metrics: PrometheusMetrics | None = None,
        clock: Clock | None = None,
        breakers: BreakerRegistry | None = None,
    ) -> None:
        self.replica_id = settings.replica_id or default_replica_id()
        self._flags = flags
        self._bottleneck = bottleneck
        self._started_wall = time.time()
        self._started = time.monotonic()
        self.errors: dict[str, int] = {}
        self.shared: SharedState | None = None
        self.registry: ReplicaRegistry | None = None
        self.admission: FleetAdmission | None = None
        self.breaker_sync: BreakerSync | None = None
        if settings.redis_url:
            self.shared = SharedState(
                settings.redis_url, prefix=settings.fleet_key_prefix, on_error=self._count_error
            )
            self.registry = ReplicaRegistry(self.shared, self.replica_id, self.describe)
            self.admission = FleetAdmission(
                self.shared,
                self.replica_id,
                flags,
                clock or SystemClock(),
                lease_ttl_s=settings.fleet_lease_ttl_s,
            )
            self.admission.bottleneck = bottleneck
            bottleneck.remote = self.admission
            registry = self.registry
            bottleneck.replica_count = lambda: registry.last_known_count
            if breakers is not None:
                self.breaker_sync = BreakerSync(self.shared, breakers, flags, self.replica_id)
        self.flag_sync: FlagSync | None = None
        if metrics is not None:
            metrics.registry.register(_FleetCollector(self))

    @property
    def configured(self) -> bool:
        return self.shared is not None

    @property
    def shared_state_up(self) -> bool:
        """False only when Redis is configured and unreachable."""
        return self.shared is None or self.shared.up

    def _count_error(self, operation: str) -> None:
        self.errors[operation] = self.errors.get(operation, 0) + 1

    def describe(self) -> dict[str, Any]:
        """This replica's state, as the registry and GET /admin/fleet show it."""
        return {
            "version": __version__,
            "startedAt": round(self._started_wall, 3),
            "uptimeS": round(time.monotonic() - self._started, 3),
            "draining": self._bottleneck.draining,
            "running": self._bottleneck.running,
            "queued": self._bottleneck.queued,
            "sharedStateUp": self.shared_state_up,
            "flagsVersion": self._flags.version,
        }

    async def start(self, store: StoreBackend) -> None:
        shared_flags = store.kind == "postgresql"
        if shared_flags or self.shared is not None:
            self.flag_sync = FlagSync(
                self._flags, self.shared, replica_id=self.replica_id, replicate_flags=shared_flags
            )
            if self.admission is not None:
                self.flag_sync.handle("admission", self.admission.on_promoted)
            if self.breaker_sync is not None:
                self.breaker_sync.attach(self.flag_sync)
            self.flag_sync.start()
        if not shared_flags and self.shared is not None:
            log.warning(
                "REDIS_URL is set but DATABASE_URL is SQLite: runtime flags and conversations "
                "stay per replica (use PostgreSQL for a fleet)"
            )
        if self.shared is not None and self.registry is not None:
            self.shared.start()
            self.registry.start()
            if self.admission is not None:
                self.admission.start()
            if self.breaker_sync is not None:
                self.breaker_sync.start()
            log.info("fleet mode", replica=self.replica_id, prefix=self.shared.prefix)

    async def close(self) -> None:
        if self.breaker_sync is not None:
            await self.breaker_sync.close()
        if self.admission is not None:
            await self.admission.close()
        if self.flag_sync is not None:
            await self.flag_sync.close()
        if self.registry is not None:
            await self.registry.close()
        if self.shared is not None:
            await self.shared.close()

    async def snapshot(self) -> dict[str, Any]:
        """GET /admin/fleet: the live replicas (from Redis) and this replica's view."""
        me = {"id": self.replica_id, **self.describe()}
        body: dict[str, Any] = {
            "replica": self.replica_id,
            "sharedState": self.shared.snapshot() if self.shared else {"configured": False},
            "lastKnownReplicaCount": self.registry.last_known_count if self.registry else 1,
        }
        if self.registry is None:
            body["replicas"] = [me]
            return body
        try:
            body["replicas"] = await self.registry.live()
        except SharedStateDown:
            body["replicas"] = [me]
            body["stale"] = True  # Redis is down: only this replica can be described
        return body

    def subscribe(self, kind: str, handler: Callable[[dict[str, Any]], None]) -> None:
        """Route fleet events of `kind` to `handler` (breaker overrides, hints)."""
        if self.flag_sync is not None:
            self.flag_sync.handle(kind, handler)


class _FleetCollector(Collector):
    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[Metric]:
        fleet = self._fleet
        up = GaugeMetricFamily(
            "fleet_shared_state_up",
            "1 when the shared state (Redis) is healthy or not configured, 0 when degraded",
        )
        up.add_metric([], 1 if fleet.shared_state_up else 0)
        yield up
        errors = CounterMetricFamily(
            "fleet_shared_state_errors",
            "Shared state (Redis) calls that failed or timed out, by operation",
            labels=["operation"],
        )
        for operation, count in sorted(fleet.errors.items()):
            errors.add_metric([operation], count)
        yield errors
        replicas = GaugeMetricFamily(
            "fleet_replicas", "Live replicas last seen in the registry (1 without Redis)"
        )
        replicas.add_metric([], fleet.registry.last_known_count if fleet.registry else 1)
        yield replicas
        version = GaugeMetricFamily(
            "fleet_flags_version", "Version of the runtime flag overrides installed here"
        )
        version.add_metric([], fleet._flags.version)
        yield version
