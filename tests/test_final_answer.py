"""A turn has one final answer: `/api/chat`'s `response`, the stream's `done.content` and
`done.response`, and the last stored assistant message are the same text — even when the model
wrote text before calling a tool (that text is streamed as chunks, but is not the answer)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import Behaviour, ToolCall
from tests.fakes.openai_server import FakeOpenAI
from tests.stream_harness import gateway, post_stream, prime, sse_events, threaded_fake

PREAMBLE = Behaviour(text="Vou calcular.", tool_calls=(ToolCall("calcular", {"expressao": "2+2"}),))
ANSWER = "O resultado é 4."


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with threaded_fake(FakeOpenAI) as upstream:
        yield upstream


def test_done_content_is_the_final_answer(tmp_path: Path, fake: FakeOpenAI) -> None:
    prime(fake)
    fake.script([PREAMBLE, Behaviour(text=ANSWER)] * 2, model="primary")
    with gateway(tmp_path, fake) as app, app.client() as client:
        plain = client.post("/api/chat", json={"message": "2+2?", "conversationId": "plain"})
        events = sse_events(post_stream(client, {"message": "2+2?", "conversationId": "sse"})[1])
        stored = client.get("/api/conversations/sse").json()["messages"]

    assert plain.status_code == 200 and plain.json()["response"] == ANSWER
    chunks = "".join(e["content"] for e in events if e["type"] == "chunk")
    assert chunks == "Vou calcular." + ANSWER  # every model turn's text was streamed
    done = events[-1]
    assert done["type"] == "done"
    assert done["content"] == done["response"] == ANSWER
    assert stored[-1]["role"] == "assistant" and stored[-1]["content"] == ANSWER
