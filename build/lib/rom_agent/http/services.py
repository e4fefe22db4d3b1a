"""How a route reaches the service's objects."""

from __future__ import annotations

from starlette.requests import Request

from rom_agent.services import Services

__all__ = ["Services", "services_of"]


def services_of(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]
