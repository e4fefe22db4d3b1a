"""Liveness, readiness and the Prometheus endpoint."""

from __future__ import annotations

import asyncio
import time

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from rom_agent.http.errors import ApiError
from rom_agent.http.services import services_of

_READY_DB_TIMEOUT_S = 2.0


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def health(request: Request) -> Response:
    """Liveness: the process answers. No dependency is checked here on purpose — a failing
    dependency must not get a healthy process restarted."""
    services = services_of(request)
    uptime = round(time.monotonic() - services.started_at, 3)
    return _json({"status": "ok", "uptime": uptime, "version": services.version})


async def ready(request: Request) -> Response:
    """Readiness: should this instance get traffic? Draining or a dead store says no."""
    services = services_of(request)
    checks: dict[str, object] = {}
    status = "ready"
    database_ok = False
    try:
        async with asyncio.timeout(_READY_DB_TIMEOUT_S):
            latency = await services.conversations.ping()
        checks["database"] = {"ok": True, "latencyMs": round(latency * 1000, 2)}
        database_ok = True
    except Exception as exc:  # any failure of the store makes us unready
        checks["database"] = {"ok": False, "error": type(exc).__name__}
        status = "degraded"
    states = dict(services.breakers.states())
    checks["breakers"] = states
    if services.breakers.enabled and all(state == "OPEN" for state in states.values()):
        # Still ready: every replica would see the same upstream outage, and answering
        # 503 CIRCUIT_OPEN fast is better than being taken out of the load balancer.
        checks["allModelsOpen"] = True
    fleet = services.fleet
    if fleet.shared is not None:
        checks["sharedState"] = fleet.shared.snapshot()
        if not fleet.shared.up and status == "ready":
            # Still 200: every replica falls back to local decisions (issue 15), so taking
            # them all out of the load balancer because Redis is down would be the outage.
            status = "degraded"
    if services.draining:
        status = "draining"
    checks["draining"] = services.draining
    checks["inFlight"] = services.in_flight.running  # chat requests a SIGTERM would wait for
    code = 200 if status == "ready" or (status == "degraded" and database_ok) else 503
    return _json({"status": status, "checks": checks}, code)


async def metrics(request: Request) -> Response:
    services = services_of(request)
    if not services.flags.current.enable_metrics:
        raise ApiError(404, "NOT_FOUND", "metrics are disabled (ENABLE_METRICS=false)")
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)
