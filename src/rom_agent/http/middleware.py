"""Pure ASGI middleware: request id, access log and HTTP metrics, at the cost of one wrapper.

Starlette's BaseHTTPMiddleware would add a task and a stream copy per request; a plain ASGI
callable adds one function frame.
"""

from __future__ import annotations

import contextlib
import os
import re
import time

import structlog
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rom_agent.domain.events import Events, HttpRequestServed, RetryAfterGiven
from rom_agent.http.errors import error_body
from rom_agent.logs import ACCESS_LOG

_INCOMING_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,64}$")
_HEADER = b"x-request-id"


def new_request_id() -> str:
    return os.urandom(8).hex()


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, events: Events) -> None:
        self.app = app
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = None
        for name, value in scope["headers"]:
            if name == _HEADER:
                if _INCOMING_ID.match(value):
                    request_id = value.decode()
                break
        if request_id is None:
            request_id = new_request_id()
        raw_id = request_id.encode()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        status = 500
        retry_after: bytes | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status, retry_after
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers", ())
                if status in (429, 503):
                    retry_after = next((v for k, v in headers if k.lower() == b"retry-after"), None)
                message["headers"] = [*headers, (_HEADER, raw_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            path = route.path if route is not None else "unmatched"
            self.events.emit(HttpRequestServed, path, status, elapsed)
            if retry_after is not None:
                with contextlib.suppress(ValueError):  # an HTTP date: not ours, not counted
                    self.events.emit(RetryAfterGiven, path, float(retry_after))
            ACCESS_LOG.request(
                scope["method"], scope["path"], status, round(elapsed * 1000, 2), request_id
            )
            structlog.contextvars.unbind_contextvars("request_id")


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight in the SPEC error body, not plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        headers = {
            name: value
            for name, value in response.headers.items()
            if name not in ("content-length", "content-type")
        }
        return Response(
            error_body(400, "CORS_REJECTED", bytes(response.body).decode()),
            status_code=400,
            headers=headers,
            media_type="application/json",
        )
