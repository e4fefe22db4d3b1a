"""OpenAI-compatible servers with quirks (llama.cpp's server, as seen in the field) behind the
real gateway: usage they never send is estimated, and their stream endings do not open breakers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.fakes import Behaviour
from tests.fakes.openai_server import FakeOpenAI
from tests.stream_harness import breaker_failures, gateway, prime, sse_events, threaded_fake

LONG = " ".join(f"word{i}" for i in range(40))


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with threaded_fake(FakeOpenAI) as upstream:
        yield upstream


def test_usage_the_upstream_never_sends_is_estimated(tmp_path: Path, fake: FakeOpenAI) -> None:
    prime(fake)
    fake.model_defaults["primary"] = Behaviour(text="Olá, tudo bem por aqui.", usage=None)
    with gateway(tmp_path, fake) as app:
        client = openai.OpenAI(base_url=app.url + "/v1", api_key="x", max_retries=0)
        chunks = list(
            client.chat.completions.create(
                model="primary",
                messages=[{"role": "user", "content": "Como vai você hoje?"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        usage = chunks[-1].usage
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (5, 6)  # ceil(chars / 4)
        assert (usage.model_extra or {}).get("estimated") is True
        with app.client() as http:
            raw = http.post("/api/chat/stream", json={"message": "Como vai você hoje?"}).content
    done = sse_events(raw)[-1]
    assert done["type"] == "done"
    assert done["usage"]["estimated"] is True and done["usage"]["outputTokens"] == 6


def test_a_server_that_interrupts_streams_does_not_open_its_breaker(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    """llama.cpp's `interrupt_requests`: each new request ends the running stream with
    `[DONE]` and no finish_reason. Eight concurrent streams: every client gets an answer or a
    clear in-band error, and the primary's breaker counts none of it (it is healthy)."""
    prime(fake)
    fake.model_defaults["primary"] = Behaviour(text=LONG, chunk_delay_s=0.02, interruptible=True)
    outcomes: list[str] = []
    lock = threading.Lock()
    # Timeouts generous enough that a loaded machine adds no failure of its own to count.
    relaxed = {"first_token_timeout_s": 5, "stream_idle_timeout_s": 5, "attempt_timeout_s": 10}
    with gateway(
        tmp_path, fake, enable_circuit_breaker=True, circuit_breaker_threshold=2, **relaxed
    ) as app:

        def one() -> None:
            with app.client() as http:
                raw = http.post("/api/chat/stream", json={"message": "hi"}).content
            last = sse_events(raw)[-1]
            with lock:
                outcomes.append(last["type"] if last["type"] == "done" else last["error"])

        threads = [threading.Thread(target=one) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        counted = breaker_failures(app.services, "primary")
        state = app.services.breakers.get("primary").snapshot()["state"]
    assert len(outcomes) == 8
    assert fake.interrupted > 0  # the quirk did strike
    for outcome in outcomes:
        assert outcome == "done" or ("[DONE]" in outcome and "finish_reason" in outcome)
    assert counted == 0
    assert state.lower() == "closed"
