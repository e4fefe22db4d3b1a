"""The OpenAPI document of the service, served at `/openapi.json`."""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from rom_agent import __version__


def document() -> dict[str, Any]:
    from rom_agent.http.routes import ROUTES  # the table imports this module's endpoint

    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = {
            "operationId": f"{route.endpoint.__module__}.{route.endpoint.__name__}",
            "responses": {"200": {"description": "OK"}},
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "ROM Agent", "version": __version__},
        "paths": paths,
    }


@cache
def _document_bytes() -> bytes:
    return orjson.dumps(document())


async def openapi(request: Request) -> Response:
    return Response(_document_bytes(), media_type="application/json")
