"""The chat routes' fast lane: exact (method, path) dispatch straight to the endpoint.

FastAPI serves every other route (admin, health, docs). The chat routes are the hot path, and
FastAPI's per-request machinery — its middleware stack, dependency solving and routing over
every route — cost about as much CPU as the whole proxying work (measured with py-spy under
wrk). These endpoints take a plain `Request` and return a `Response`, so they need none of it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from rom_agent.http.errors import error_response, to_api_error
from rom_agent.logs import get_logger

Endpoint = Callable[[Request], Awaitable[Response]]

log = get_logger("rom_agent.http")


@dataclass(frozen=True, slots=True)
class FastRoute:
    """What the access log and `http_requests_total{route}` read from `scope["route"]`."""

    path: str
    endpoint: Endpoint
    openai_errors: bool = False


class FastLane:
    def __init__(self, app: ASGIApp, routes: list[tuple[str, FastRoute]]) -> None:
        self.app = app
        self._routes = {(method, route.path): route for method, route in routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = (
            self._routes.get((scope["method"], scope["path"])) if scope["type"] == "http" else None
        )
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route
        request = Request(scope, receive, send)
        try:
            response = await route.endpoint(request)
        except Exception as exc:
            error = to_api_error(exc)
            if error.code == "INTERNAL":
                log.exception("unhandled error", error=type(exc).__name__)
            response = error_response(error, openai=route.openai_errors)
        await response(scope, receive, send)
