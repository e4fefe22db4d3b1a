"""No request outlives its answer: the default service keeps nothing per turn (a simulator
that recorded every request grew RSS by ~15 KB per turn on long conversations)."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest

from rom_agent.domain.messages import (
    ChatRequest,
    Message,
)
from rom_agent.providers.simulator import SimulatorProvider
from tests.server import isolated_settings, running_app
from tests.stream_harness import post_stream


@pytest.mark.parametrize("streamed", [False, True], ids=["complete", "stream"])
async def test_the_simulator_keeps_no_reference_to_a_request(streamed: bool) -> None:
    sim = SimulatorProvider()
    request = ChatRequest("rom-sim-1", (Message.text("user", "olá"),))
    before = sys.getrefcount(request)
    if streamed:
        _ = [event async for event in sim.stream(request)]
    else:
        await sim.complete(request)
    assert sys.getrefcount(request) == before


def live_requests() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is ChatRequest)


def test_the_default_service_keeps_no_request_after_answering(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path)  # the default chain: the simulator
    turns = 40
    with running_app(settings) as app, app.client() as client:
        before = live_requests()
        for i in range(turns):
            body = {"message": f"turno {i}", "conversationId": "long"}
            if i % 2:
                assert post_stream(client, body)[0].status_code == 200
            else:
                assert client.post("/api/chat", json=body).status_code == 200
        after = live_requests()
    assert after - before < turns // 4  # not one per turn
