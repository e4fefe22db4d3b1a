"""The history window sent to a real OpenAI-compatible upstream after a run whose tool use was
ended (turn cap, guardrail): it starts at a user turn, never at an orphaned tool result.

The fake rejects a body whose `tool` message does not follow its tool call with real OpenAI's
400, so a bad window shows up as the failed turn it causes in production.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import Behaviour, ToolCall
from tests.fakes.openai_server import FakeOpenAI
from tests.stream_harness import gateway, post_stream, prime, sse_events, threaded_fake

CALL = Behaviour(text="", tool_calls=(ToolCall("calcular", {"expressao": "2 + 2"}),))
ANSWER = Behaviour(text="O resultado é 4.")


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with threaded_fake(FakeOpenAI) as upstream:
        yield upstream


def first_roles(fake: FakeOpenAI) -> list[str]:
    return [request.json["messages"][0]["role"] for request in fake.requests]


@pytest.mark.parametrize("window", [1, 2, 3])
@pytest.mark.parametrize(
    "stop",
    [
        {"max_agent_turns": 2},
        {
            "enable_guardrails": True,
            "guardrail_mode": "full",
            "guardrail_soft_limit": 1,
            "guardrail_hard_limit": 1,
        },
    ],
    ids=["max_agent_turns", "guardrail"],
)
def test_a_turn_after_ended_tool_use_starts_at_a_user_turn(
    tmp_path: Path, fake: FakeOpenAI, window: int, stop: dict[str, object]
) -> None:
    prime(fake)
    # The first turn calls the tool twice in a row; the second call is where tool use ends.
    fake.script([CALL, CALL, ANSWER, ANSWER], model="primary")
    settings = {"history_max_messages": window, **stop}
    with gateway(tmp_path, fake, **settings) as app, app.client() as client:
        first = client.post("/api/chat", json={"message": "2 + 2?", "conversationId": "c"})
        assert first.status_code == 200, first.text
        second = client.post("/api/chat", json={"message": "e agora?", "conversationId": "c"})
        assert second.status_code == 200, second.text
        assert second.json()["response"] == ANSWER.text

    assert "tool" not in first_roles(fake)
    # The model answered on the first try: no 400, no fallback to `backup`.
    assert [r.model for r in fake.requests] == ["primary"] * len(fake.requests)


def test_a_streamed_turn_after_ended_tool_use_starts_at_a_user_turn(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    prime(fake)
    fake.script([CALL, CALL, ANSWER, ANSWER], model="primary")
    settings = {"history_max_messages": 2, "max_agent_turns": 2}
    with gateway(tmp_path, fake, **settings) as app, app.client() as client:
        body = {"message": "quanto é 2 + 2?", "conversationId": "s"}
        assert sse_events(post_stream(client, body)[1])[-1]["type"] == "done"
        body = {"message": "e agora?", "conversationId": "s"}
        events = sse_events(post_stream(client, body)[1])
    assert events[-1]["type"] == "done", events[-1]
    assert "tool" not in first_roles(fake)


@pytest.mark.parametrize("window", [2, 3])
def test_the_postgresql_store_gives_the_same_window(
    tmp_path: Path, fake: FakeOpenAI, pg_url: str, window: int
) -> None:
    prime(fake)
    fake.script([CALL, CALL, ANSWER, ANSWER], model="primary")
    settings = {"history_max_messages": window, "max_agent_turns": 2, "database_url": pg_url}
    with gateway(tmp_path, fake, **settings) as app, app.client() as client:
        for text in ("2 + 2?", "e agora?"):
            reply = client.post("/api/chat", json={"message": text, "conversationId": "pg"})
            assert reply.status_code == 200, reply.text
    assert "tool" not in first_roles(fake)
    assert [r.model for r in fake.requests] == ["primary"] * len(fake.requests)
