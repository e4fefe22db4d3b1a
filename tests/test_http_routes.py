"""The one route table and the one error mapper, over real HTTP (uvicorn on a loopback port)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rom_agent.app import ServiceApp
from tests.server import RunningApp, isolated_settings, running_app

SPEC_KEYS = {"error", "status", "code"}


class Marker:
    """A middleware as anyone would add one: it stamps every response it wraps."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-marker", b"1")]
            await send(message)

        await self.app(scope, receive, stamped)


class Broken:
    """A middleware with a bug on one route."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in ("/api/chat", "/v1/chat/completions"):
            raise RuntimeError("bug in a middleware")
        await self.app(scope, receive, send)


def _add(middleware: type) -> object:
    def configure(app: ServiceApp) -> None:
        app.add_middleware(middleware)

    return configure


@pytest.fixture
def marked(tmp_path: Path) -> Iterator[RunningApp]:
    settings = isolated_settings(tmp_path, admin_token="t" * 40)
    with running_app(settings, configure=_add(Marker)) as running:  # type: ignore[arg-type]
        yield running


def spec_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == SPEC_KEYS and body["status"] == status and body["code"] == code
    return body


def openai_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["status"] == status
    return body


def test_a_middleware_added_the_usual_way_wraps_every_route(marked: RunningApp) -> None:
    chat = {"mensagem": "oi"}
    completion = {"model": "rom-sim-1", "messages": [{"role": "user", "content": "oi"}]}
    with marked.client() as client:
        responses = [
            client.post("/api/chat", json=chat),
            client.post("/api/chat/stream", json=chat),
            client.post("/v1/chat/completions", json=completion),
            client.get("/v1/models"),
            client.get("/health"),
            client.get("/ready"),
            client.get("/metrics"),
            client.get("/openapi.json"),
            client.get("/admin/flags", headers={"x-admin-token": "t" * 40}),
            client.get("/admin/flags"),  # 401
            client.get("/api/conversations/nope"),  # 404 from the endpoint
            client.get("/no/such/route"),  # 404 from the router
            client.get("/api/chat"),  # 405
            client.post("/api/chat", content=b"{"),  # 400
        ]
    seen = [(r.request.method, r.request.url.path, r.status_code) for r in responses]
    assert [r.status_code for r in responses] == [
        200, 200, 200, 200, 200, 200, 200, 200, 200, 401, 404, 404, 405, 400
    ], seen  # fmt: skip
    missing = [s for s, r in zip(seen, responses, strict=True) if r.headers.get("x-marker") != "1"]
    assert missing == []


def test_router_errors_use_the_error_body_of_the_route_family(marked: RunningApp) -> None:
    with marked.client() as client:
        spec_error(client.get("/no/such/route"), 404, "NOT_FOUND")
        not_allowed = client.get("/api/chat")
        spec_error(not_allowed, 405, "METHOD_NOT_ALLOWED")
        assert not_allowed.headers["allow"] == "POST"
        flags = client.put("/admin/flags")
        spec_error(flags, 405, "METHOD_NOT_ALLOWED")
        assert flags.headers["allow"] == "GET, HEAD, PATCH"  # every method the table serves
        # /v1/… answer in OpenAI's shape, so the SDKs parse even the router's answers
        openai_error(client.get("/v1/chat/completions"), 405, "METHOD_NOT_ALLOWED")
        openai_error(client.get("/v1/no-such-route"), 404, "NOT_FOUND")
        assert client.post("/api/chat/", json={"mensagem": "oi"}).status_code == 404  # no redirect


def test_head_is_served_wherever_get_is(marked: RunningApp) -> None:
    with marked.client() as client:
        for path in ("/health", "/ready", "/metrics", "/v1/models"):
            response = client.head(path)
            assert response.status_code == 200, path
            assert response.content == b""


def test_a_failure_outside_any_endpoint_is_still_the_documented_500(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path)
    with (
        running_app(settings, configure=_add(Broken)) as running,  # type: ignore[arg-type]
        running.client() as client,
    ):
        body = spec_error(client.post("/api/chat", json={"mensagem": "oi"}), 500, "INTERNAL")
        assert body["error"] == "internal error"  # never the exception's text
        completion = client.post("/v1/chat/completions", json={})
        assert openai_error(completion, 500, "INTERNAL")["error"]["type"] == "server_error"
        assert client.get("/health").status_code == 200


def test_an_unexpected_failure_in_an_endpoint_is_a_500_in_the_routes_shape(
    tmp_path: Path,
) -> None:
    settings = isolated_settings(tmp_path)
    with running_app(settings) as running, running.client() as client:

        async def broken(conversation_id: str) -> None:
            raise RuntimeError("secret detail")

        running.services.conversations.get = broken  # type: ignore[method-assign]
        body = spec_error(client.get("/api/conversations/abc"), 500, "INTERNAL")
        assert "secret" not in body["error"]


def test_a_refused_cors_preflight_is_the_json_error_body(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, cors_origins="https://ok.example")
    with running_app(settings) as running, running.client() as client:
        preflight = {"access-control-request-method": "POST"}
        refused = client.options(
            "/api/chat", headers={**preflight, "origin": "https://evil.example"}
        )
        spec_error(refused, 400, "CORS_REJECTED")
        allowed = client.options("/api/chat", headers={**preflight, "origin": "https://ok.example"})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://ok.example"
