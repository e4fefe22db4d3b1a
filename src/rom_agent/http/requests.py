"""What every API route does with a request: authenticate it, read its body within the
limit, parse it as a JSON object, answer JSON."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from rom_agent.http.errors import ApiError, invalid
from rom_agent.services import Services

_ASCII_INT = re.compile(r"[0-9]{1,18}")


def ascii_int(raw: str) -> int | None:
    """A non-negative integer written in ASCII digits only, else None. `str.isdigit()` and
    `int()` also take "²", "٣" or "1_000"; a header or a query string must not."""
    return int(raw) if _ASCII_INT.fullmatch(raw) else None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it exceeds `limit` — never buffered whole —
    and (408, connection closed) when it is not all there within `BODY_TIMEOUT_S`."""
    timeout_s = request.app.state.services.flags.current.body_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_body(request, limit)
    except TimeoutError:
        raise ApiError(
            408,
            "REQUEST_TIMEOUT",
            f"request body not received within {timeout_s:g} s",
            headers={"Connection": "close"},
        ) from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    size_declared = ascii_int(declared) if declared is not None else None
    if size_declared is not None and size_declared > limit:
        raise ApiError(413, "BODY_TOO_LARGE", f"request body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "BODY_TOO_LARGE", f"request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise invalid("request body must be a JSON object")
    return data


def check_api_key(request: Request, services: Services) -> None:
    if not services.api_key_digests:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not services.api_key_valid(key.strip()):
        raise ApiError(
            401,
            "UNAUTHORIZED",
            "missing or invalid API key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def json_response(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")
