"""The two pages served by the service itself: the chat page (`/`, `/chat`) and the operator
console (`/console`), with their static files. Server-rendered HTML and plain JavaScript, no
build step; see docs/decisions.md ("Console and chat page")."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from rom_agent.http.web import console
from rom_agent.http.web.assets import STATIC_PREFIX, asset_url, render, static_response

Endpoint = Callable[[Request], Awaitable[Response]]


async def chat_page(request: Request) -> Response:
    return render("chat.html", chat_js=asset_url("chat.js"))


async def static_file(request: Request) -> Response:
    return static_response(request.url.path, request.headers.get("if-none-match"))


# (method, path, endpoint): registered by the application's route table.
ROUTES: tuple[tuple[str, str, Endpoint], ...] = (
    ("GET", "/", chat_page),
    ("GET", "/chat", chat_page),
    ("GET", STATIC_PREFIX + "{name}", static_file),
    ("GET", "/console", console.console_page),
    ("POST", "/console/session", console.login),
    ("POST", "/console/logout", console.logout),
    ("GET", "/console/events", console.events),
    ("GET", "/console/api/flags", console.flags),
    ("PATCH", "/console/api/flags", console.patch_flags),
    ("DELETE", "/console/api/flags/{key}", console.delete_flag),
    ("POST", "/console/api/breakers/{model}/{action}", console.breaker_action),
    ("POST", "/console/api/rollout", console.start_rollout),
    ("GET", "/console/rollout/report", console.rollout_report),
    # Admin-token routes: `rom-agent rollout` reports its progress for the console to watch.
    ("POST", "/admin/rollout/lines", console.rollout_lines),
    ("POST", "/admin/rollout/report", console.rollout_report_upload),
)
