"""A chat run ends when its client leaves or its deadline passes — whatever it is waiting on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rom_agent.agent.tools import ToolRegistry, register_calculator
from rom_agent.app import create_services
from tests.fakes import Behaviour
from tests.fakes.openai_server import FakeOpenAI
from tests.gates import wait_until
from tests.server import isolated_settings, running_app
from tests.stream_harness import PRIMARY_TEXT, gateway, prime, threaded_fake


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with threaded_fake(FakeOpenAI) as upstream:
        yield upstream


def test_a_client_leaving_a_stream_ends_its_run(tmp_path: Path, fake: FakeOpenAI) -> None:
    """The run (model turns, tools, the store) stops with the client: the upstream call is
    cancelled mid-answer and the turn is not stored."""
    prime(fake)
    # Slow but finishing: a run left behind would complete and store the turn.
    fake.model_defaults["primary"] = Behaviour(text=PRIMARY_TEXT, chunk_delay_s=0.05)
    with gateway(tmp_path, fake) as app, app.client() as client:
        body = {"message": "hi", "conversationId": "left"}
        with client.stream("POST", "/api/chat/stream", json=body) as response:
            for line in response.iter_lines():
                if '"chunk"' in line:
                    break  # one chunk seen; the client leaves
        wait_until(lambda: fake.in_flight == 0)
        assert fake.cancelled == 1  # cut off mid-answer, not left to finish
        assert client.get("/api/conversations/left").status_code == 404


def slow_tool_registry(started: list[str]) -> ToolRegistry:
    registry = ToolRegistry()
    register_calculator(registry)

    async def esperar(args: dict[str, Any]) -> str:
        started.append(type(asyncio.get_running_loop()).__module__)  # which loop serves
        await asyncio.Event().wait()  # never finishes: only the run's deadline ends it
        return "nunca"

    registry.register("esperar", "Espera.", {"type": "object"}, esperar, timeout_s=3600)
    return registry


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("route", ["/api/chat", "/api/chat/stream"])
def test_the_deadline_bounds_the_whole_run_tool_time_included(
    tmp_path: Path, route: str, loop: str
) -> None:
    settings = isolated_settings(tmp_path, request_timeout_s=0.5)
    started: list[str] = []
    services = create_services(settings, tools=slow_tool_registry(started))
    running = running_app(settings, services, uvloop=loop == "uvloop")
    with running as app, app.client() as client:
        response = client.post(route, json={"message": "SIM_TOOLS:esperar*1"})
    assert len(started) == 1 and started[0].startswith(loop)
    if route == "/api/chat":
        assert response.status_code == 504, response.text
        assert response.json()["code"] == "TIMEOUT"
    else:
        last = response.text.strip().rsplit("data: ", 1)[-1]
        assert '"type":"error"' in last and "TIMEOUT" in last
