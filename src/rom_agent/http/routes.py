"""The one route table: every route the service answers, declared once.

Adding a route is one line in `ROUTES`: method, path (Starlette syntax, `{name}` parameters
read from `request.path_params`), endpoint `async (Request) -> Response`. An endpoint raises
`ApiError` (or any known failure) and the one error mapper (`errors.error_response_for`) turns
it into the SPEC body, or OpenAI's body on routes declared with `errors=OPENAI`. A `guard` runs
before the endpoint (the admin token check); `drains=True` marks the chat routes a SIGTERM
waits for (`http/drain.py`). The hot chat routes come first: Starlette's router
tries routes in order.

Every route is served by the same Starlette application, so a middleware added the usual way
(`app.add_middleware`) wraps every route.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router, compile_path
from starlette.types import Receive, Scope, Send

from rom_agent.http import admin, chat, health, openai_compat, openapi, responses_api, web
from rom_agent.http.errors import (
    OPENAI,
    SPEC,
    ApiError,
    ErrorShape,
    error_response_for,
    shape_of,
)
from rom_agent.http.services import services_of

Endpoint = Callable[[Request], Awaitable[Response]]
Guard = Callable[[Request], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ApiRoute:
    method: str
    path: str
    endpoint: Endpoint
    errors: ErrorShape = SPEC
    guard: Guard | None = None
    drains: bool = False  # a SIGTERM waits for it; refused with 503 DRAINING once draining


ROUTES: tuple[ApiRoute, ...] = (
    ApiRoute("POST", "/api/chat", chat.chat, drains=True),
    ApiRoute("POST", "/api/chat/stream", chat.chat_stream, drains=True),
    ApiRoute("POST", "/v1/chat/completions", openai_compat.chat_completions, OPENAI, drains=True),
    ApiRoute("GET", "/v1/models", openai_compat.list_models, OPENAI),
    ApiRoute("POST", "/v1/responses", responses_api.create_response, OPENAI, drains=True),
    ApiRoute("GET", "/v1/models/{model_id:path}", openai_compat.get_model, OPENAI),
    ApiRoute("GET", "/api/conversations/{conversation_id}", chat.get_conversation),
    ApiRoute("GET", "/health", health.health),
    ApiRoute("GET", "/ready", health.ready),
    ApiRoute("GET", "/metrics", health.metrics),
    ApiRoute("GET", "/openapi.json", openapi.openapi),
    ApiRoute("GET", "/admin/flags", admin.get_flags, guard=admin.require_admin),
    ApiRoute("PATCH", "/admin/flags", admin.patch_flags, guard=admin.require_admin),
    ApiRoute("GET", "/admin/flags/history", admin.flag_history, guard=admin.require_admin),
    ApiRoute("DELETE", "/admin/flags/{key}", admin.delete_flag, guard=admin.require_admin),
    ApiRoute("GET", "/admin/breakers", admin.get_breakers, guard=admin.require_admin),
    ApiRoute(
        "POST", "/admin/breakers/{model}/{action}", admin.breaker_action, guard=admin.require_admin
    ),
    ApiRoute("GET", "/admin/bottleneck", admin.get_bottleneck, guard=admin.require_admin),
    ApiRoute("GET", "/admin/fleet", admin.get_fleet, guard=admin.require_admin),
    # The chat page and the operator console (`http/web/`): their own list, same table.
    *(ApiRoute(method, path, endpoint) for method, path, endpoint in web.ROUTES),
)


class _Handler:
    """The ASGI app of one route: guard, endpoint, and every failure through the one mapper.

    A plain ASGI callable rather than Starlette's `request_response` wrapper: the mapper
    already handles every exception, so the wrapper's second exception layer is not needed.
    """

    __slots__ = ("route",)

    def __init__(self, route: ApiRoute) -> None:
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        route = self.route
        in_flight = services_of(request).in_flight if route.drains else None
        try:
            if in_flight is not None:
                in_flight.enter()
        except Exception as exc:
            await error_response_for(exc, route.errors)(scope, receive, send)
            return
        try:
            try:
                if route.guard is not None:
                    await route.guard(request)
                response = await route.endpoint(request)
            except Exception as exc:
                response = error_response_for(exc, route.errors)
            await response(scope, receive, send)
        finally:
            if in_flight is not None:
                in_flight.exit()


class TableRoute(Route):
    """A Starlette route built from an `ApiRoute` (the router puts it in `scope["route"]`,
    where the access log and `http_requests_total{route}` read the path template)."""

    def __init__(self, route: ApiRoute) -> None:
        super().__init__(route.path, _Handler(route), methods=[route.method])
        self.api_route = route

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.methods is not None and scope["method"] not in self.methods:
            path = scope["path"]
            error = ApiError(
                405,
                "METHOD_NOT_ALLOWED",
                f"method {scope['method']} is not allowed on {path}",
                headers={"Allow": ", ".join(allowed_methods(path))},
            )
            await error_response_for(error, shape_of(scope))(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    error = ApiError(404, "NOT_FOUND", "route not found")
    await error_response_for(error, shape_of(scope))(scope, receive, send)


class TableRouter(Router):
    """Starlette's router, with routes without parameters found by one dict lookup.

    Starlette tries each route's regular expression in turn; that walk was a sixth of the CPU
    of a `GET /v1/models` (cProfile). Paths with parameters, 404s and 405s take the usual walk.
    """

    def __init__(self, routes: tuple[ApiRoute, ...], **kwargs: Any) -> None:
        table = [TableRoute(route) for route in routes]
        super().__init__(routes=table, redirect_slashes=False, default=_not_found, **kwargs)
        self._exact = {
            (route.api_route.method, route.path): route
            for route in table
            if not route.param_convertors
        }

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            route = self._exact.get((scope["method"], scope["path"]))
            if route is not None:
                scope["router"] = self
                scope["route"] = route
                scope["endpoint"] = route.endpoint
                scope["path_params"] = {}
                await route.app(scope, receive, send)
                return
        await super().app(scope, receive, send)


_PATTERNS = tuple((compile_path(route.path)[0], route.method) for route in ROUTES)


def allowed_methods(path: str) -> list[str]:
    """The methods the table serves on `path` (for a 405's `Allow`); GET implies HEAD."""
    methods = {method for pattern, method in _PATTERNS if pattern.match(path)}
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)
