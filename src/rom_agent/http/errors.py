"""The one error body of the API: {"error": message, "status": code, "code": CODE}.

Every failure — our own validation, an admission rejection, a pipeline outcome — becomes an
`ApiError` here, so each route and each error event maps errors the same way. The
OpenAI-compatible routes (`/v1/…`) answer in OpenAI's shape instead, so the official SDKs
raise their usual exceptions; the SPEC's `status` and `code` ride along at the top level.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rom_agent.logs import get_logger
from rom_agent.resilience.admission_permits import AdmissionRejected
from rom_agent.resilience.errors import CircuitOpenError, PipelineError
from rom_agent.store.database import DatabaseClosedError

ErrorShape = Literal["spec", "openai"]
SPEC: ErrorShape = "spec"
OPENAI: ErrorShape = "openai"

log = get_logger("rom_agent.http")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        openai_code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers: Mapping[str, str] = headers or {}
        self.openai_code = openai_code  # OpenAI's own code for this error, where it has one
        self.param = param

    @property
    def recoverable(self) -> bool:
        """Worth retrying later as is (our overload, an upstream outage), not a bad request."""
        return self.status >= 500 or self.status == 429


def invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_REQUEST", message)


def to_api_error(exc: Exception) -> ApiError:
    """Map any known failure to the error the client sees; unknown ones are a 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, AdmissionRejected):
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        return ApiError(exc.status, exc.code, exc.message, headers=headers)
    if isinstance(exc, CircuitOpenError):
        return ApiError(
            exc.status, exc.code, exc.message, headers={"Retry-After": str(exc.retry_after_s)}
        )
    if isinstance(exc, PipelineError):
        return ApiError(
            exc.status, exc.code, exc.message, openai_code=exc.openai_code, param=exc.param
        )
    if isinstance(exc, DatabaseClosedError):  # shutting down: the turn was not stored
        return ApiError(503, "UNAVAILABLE", "service is shutting down; retry the request")
    if isinstance(exc, HTTPException):  # raised by Starlette itself, not by our routes
        return ApiError(exc.status_code, "HTTP_ERROR", str(exc.detail), headers=exc.headers)
    if isinstance(exc, ClientDisconnect):
        # The client left while its body was uploading: its failure, not ours (nginx's 499).
        # Nobody receives this answer; the status is for the access log and the metrics.
        return client_closed("client disconnected while sending the request body")
    return ApiError(500, "INTERNAL", "internal error")


def client_closed(message: str) -> ApiError:
    return ApiError(499, "CLIENT_CLOSED_REQUEST", message)


def error_body(status: int, code: str, message: str) -> bytes:
    return orjson.dumps({"error": message, "status": status, "code": code})


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error_payload(error: ApiError) -> dict[str, object]:
    kind = _OPENAI_TYPES.get(error.status, "server_error" if error.status >= 500 else "api_error")
    return {
        "error": {
            "message": error.message,
            "type": kind,
            "param": error.param,
            "code": error.openai_code or error.code,
        },
        "status": error.status,
        "code": error.code,
    }


def error_response_for(exc: Exception, shape: ErrorShape = SPEC) -> Response:
    """The one error mapper: any exception raised by a route → the response its client gets.
    Only failures nobody anticipated are logged with a traceback (they become a bare 500)."""
    error = to_api_error(exc)
    if error.code == "INTERNAL":
        log.error("unhandled error", error=type(exc).__name__, exc_info=exc)
    return error_response(error, openai=shape == OPENAI)


def error_response(error: ApiError, *, openai: bool = False) -> Response:
    body = (
        orjson.dumps(openai_error_payload(error))
        if openai
        else error_body(error.status, error.code, error.message)
    )
    return Response(
        body, status_code=error.status, headers=error.headers, media_type="application/json"
    )


def shape_of(scope: Scope) -> ErrorShape:
    """The error shape of the route that served `scope`; `/v1/…` paths no route matched get
    OpenAI's, so the SDKs parse even a 404."""
    route = scope.get("route")
    api_route = getattr(route, "api_route", None)
    if api_route is not None:
        return api_route.errors  # type: ignore[no-any-return]
    return OPENAI if scope["path"].startswith("/v1/") else SPEC


class ErrorMapperMiddleware:
    """The outermost layer: whatever escapes the router or a middleware (a 404, a 405, a bug)
    goes through the one mapper too, and never becomes Starlette's or uvicorn's plain text."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            if started:  # too late for an error body: uvicorn closes the connection
                raise
            await error_response_for(exc, shape_of(scope))(scope, receive, send)
