"""`langchain-openai` through the gateway, as LangChain users call it: `bind_tools` with a
forced `tool_choice`, and `with_structured_output` (function calling and JSON schema).

Before issue 14 the gateway dropped `tool_choice` and `response_format`: the forced tool call
never came and `with_structured_output(..., method="function_calling")` returned None.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.fakes.openai_server import FakeOpenAI
from tests.server import RunningApp
from tests.stream_harness import PRIMARY_TEXT, gateway, prime, threaded_fake


class Deadline(BaseModel):
    """A procedural deadline."""

    act: str = Field(description="the procedural act")
    days: int = Field(description="working days to do it")


def weather(city: str) -> str:
    """Current weather for a city."""
    return f"31 °C in {city}"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with threaded_fake(FakeOpenAI) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake: FakeOpenAI) -> Iterator[RunningApp]:
    with gateway(tmp_path_factory.mktemp("langchain"), fake) as running:
        yield running


@pytest.fixture
def llm(app: RunningApp, fake: FakeOpenAI) -> ChatOpenAI:
    prime(fake)
    return ChatOpenAI(
        model="primary",
        base_url=app.url + "/v1",
        api_key="unused",
        max_retries=0,  # type: ignore[arg-type]
    )


def test_bind_tools_with_a_forced_tool_choice(llm: ChatOpenAI, fake: FakeOpenAI) -> None:
    message = llm.bind_tools([weather], tool_choice="weather").invoke("Oi")
    assert [(call["name"], call["args"]) for call in message.tool_calls] == [
        ("weather", {"city": "city (fake)"})
    ]
    sent = fake.requests[-1].json
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "weather"}}


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_with_structured_output(llm: ChatOpenAI, method: str) -> None:
    result = llm.with_structured_output(Deadline, method=method).invoke("Prazo da apelação?")  # type: ignore[arg-type]
    print(f"\nwith_structured_output(Deadline, method={method!r}) -> {result!r}")
    assert result == Deadline(act="act (fake)", days=42)


def test_streaming_through_langchain(llm: ChatOpenAI) -> None:
    text = "".join(str(chunk.content) for chunk in llm.stream("Oi"))
    assert text == PRIMARY_TEXT
