"""The operator console: `/console` and its endpoints (session cookie, see `session`).

Reads and changes go through the admin API's own handlers (`http.admin`), so the console
validates, persists and audits exactly like `PATCH /admin/flags` — it adds only the session
and CSRF checks in front. The live state is one Server-Sent Events stream per open console.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse

from rom_agent.http import admin
from rom_agent.http.errors import ApiError, invalid
from rom_agent.http.requests import json_response, parse_json_object, read_body
from rom_agent.http.services import services_of
from rom_agent.http.web.assets import asset_url, render
from rom_agent.http.web.live import LiveState
from rom_agent.http.web.rollout_runner import RolloutRunner
from rom_agent.http.web.session import (
    admin_token,
    clear_session_cookie,
    current_session,
    log,
    new_cookie_value,
    require_mutation,
    require_session,
    same_origin,
    set_session_cookie,
    token_matches,
)

PUSH_INTERVAL_S = 1.0
_LOGIN_MAX_BYTES = 4096
_NO_STORE = {"Cache-Control": "no-store"}


def _live(request: Request) -> LiveState:
    state = request.app.state
    live: LiveState | None = getattr(state, "console_live", None)
    if live is None:
        live = state.console_live = LiveState(services_of(request))
    return live


def _rollouts(request: Request) -> RolloutRunner:
    state = request.app.state
    runner: RolloutRunner | None = getattr(state, "console_rollouts", None)
    if runner is None:
        runner = state.console_rollouts = RolloutRunner()
    return runner


def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response


# ---------------------------------------------------------------------- page, login, logout


async def console_page(request: Request) -> Response:
    session = current_session(request)  # 503 ADMIN_DISABLED when there is no token
    if session is None:
        return render("login.html", error="")
    services = services_of(request)
    return render(
        "console.html",
        csrf=session.csrf,
        version=services.version,
        console_js=asset_url("console.js"),
    )


async def login(request: Request) -> Response:
    """POST /console/session: a form post (works without JavaScript) with `token`."""
    expected = admin_token(request)
    if not same_origin(request):
        raise ApiError(403, "CSRF_FAILED", "cross-site request refused (CSRF check failed)")
    raw = await read_body(request, _LOGIN_MAX_BYTES)
    if request.headers.get("content-type", "").startswith("application/json"):
        presented = parse_json_object(raw).get("token")
    else:
        presented = urllib.parse.parse_qs(raw.decode("utf-8", "replace")).get("token", [""])[0]
    if not isinstance(presented, str) or not token_matches(presented, expected):
        log.warning("console login failed", client=admin.client_of(request))
        return render("login.html", status=401, error="Wrong admin token.")
    log.info("console login", client=admin.client_of(request))
    response = RedirectResponse("/console", status_code=303, headers=_NO_STORE)
    set_session_cookie(response, new_cookie_value(expected))
    return response


async def logout(request: Request) -> Response:
    require_mutation(request)
    response = RedirectResponse("/console", status_code=303, headers=_NO_STORE)
    clear_session_cookie(response)
    return response


# ---------------------------------------------------------------------- live state


async def events(request: Request) -> Response:
    """GET /console/events: the whole state as one SSE `data:` event about once a second."""
    require_session(request)
    services = services_of(request)
    live = _live(request)
    rollouts = _rollouts(request)

    async def stream() -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"
        while True:
            run = rollouts.current
            state = await live.snapshot(run.view() if run is not None else None)
            yield b"data: " + orjson.dumps(state) + b"\n\n"
            if services.draining:
                return  # let the graceful shutdown finish; the page shows "draining"
            await asyncio.sleep(PUSH_INTERVAL_S)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# ---------------------------------------------------------------------- flags, breakers


async def flags(request: Request) -> Response:
    """GET /console/api/flags: the admin view of the flags plus the recent audit history."""
    require_session(request)
    services = services_of(request)
    entries = await services.flags.history(50)
    body: dict[str, Any] = admin.flags_view(services.flags)
    body["history"] = [entry.to_dict() for entry in entries]
    return _no_store(json_response(body))


async def patch_flags(request: Request) -> Response:
    require_mutation(request)
    return _no_store(await admin.patch_flags(request))


async def delete_flag(request: Request) -> Response:
    require_mutation(request)
    return _no_store(await admin.delete_flag(request))


async def breaker_action(request: Request) -> Response:
    require_mutation(request)
    return _no_store(await admin.breaker_action(request))


# ---------------------------------------------------------------------- rollout


async def start_rollout(request: Request) -> Response:
    """POST /console/api/rollout: run `rom-agent rollout` against this service."""
    require_mutation(request)
    runner = _rollouts(request)
    if runner.running:
        raise ApiError(409, "ROLLOUT_RUNNING", "a rollout is already running")
    raw = await read_body(request, _LOGIN_MAX_BYTES)
    data = parse_json_object(raw) if raw.strip() else {}
    options: dict[str, int] = {}
    for name in ("max_concurrent", "max_queue", "burst_delay_ms"):
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 100_000:
            raise invalid(f"field {name!r} must be a positive integer")
        options[name] = value
    api_key = data.get("apiKey")
    if api_key is not None and not isinstance(api_key, str):
        raise invalid("field 'apiKey' must be a string")
    run = runner.start(
        url=str(request.base_url).rstrip("/"),
        token=admin_token(request),
        client=admin.client_of(request),
        options=options,
        api_key=api_key or None,
    )
    return _no_store(json_response(run.view(), status=202))


async def rollout_report(request: Request) -> Response:
    require_session(request)
    run = _rollouts(request).current
    if run is None or run.report is None or not run.report_ready:
        raise ApiError(404, "NOT_FOUND", "no rollout report yet")
    text = run.report.read_text("utf-8")
    return PlainTextResponse(
        text, headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    )


# ---------------------------------------------------------------------- a CLI rollout, watched

_FEED_MAX_BYTES = 256 * 1024
_REPORT_MAX_BYTES = 2 * 1024 * 1024
_RUN_ID_CHARS = 64


def _run_id(data: dict[str, Any]) -> str:
    run_id = data.get("run")
    if not isinstance(run_id, str) or not 0 < len(run_id) <= _RUN_ID_CHARS:
        raise invalid(f"field 'run' must be a string of 1-{_RUN_ID_CHARS} characters")
    return run_id


async def rollout_lines(request: Request) -> Response:
    """POST /admin/rollout/lines (X-Admin-Token): output lines of `rom-agent rollout`."""
    await admin.require_admin(request)
    data = parse_json_object(await read_body(request, _FEED_MAX_BYTES))
    lines = data.get("lines")
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        raise invalid("field 'lines' must be a list of strings")
    try:
        _rollouts(request).watch(_run_id(data), lines, admin.client_of(request))
    except RuntimeError as exc:
        raise ApiError(409, "ROLLOUT_RUNNING", str(exc)) from None
    return json_response({"accepted": len(lines)})


async def rollout_report_upload(request: Request) -> Response:
    """POST /admin/rollout/report (X-Admin-Token): the report of the watched CLI rollout."""
    await admin.require_admin(request)
    data = parse_json_object(await read_body(request, _REPORT_MAX_BYTES))
    text = data.get("text")
    if not isinstance(text, str):
        raise invalid("field 'text' must be a string")
    if not _rollouts(request).save_report(_run_id(data), text):
        raise ApiError(404, "NOT_FOUND", "no watched rollout with that run id")
    return json_response({"saved": True})
