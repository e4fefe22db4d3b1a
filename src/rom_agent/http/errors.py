"""The one error body of the API: {"error": message, "status": code, "code": CODE}."""

from __future__ import annotations

import orjson
from starlette.responses import Response


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_body(status: int, code: str, message: str) -> bytes:
    return orjson.dumps({"error": message, "status": status, "code": code})


def error_response(error: ApiError) -> Response:
    return Response(
        error_body(error.status, error.code, error.message),
        status_code=error.status,
        headers=error.headers,
        media_type="application/json",
    )


def invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_REQUEST", message)
