"""`POST /v1/responses` with the official `openai` SDK, as its users call it: plain and
streamed, text and message input, function tools, structured output, errors as the SDK's
exception classes — through the real gateway to the real fake upstream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from pydantic import BaseModel

from tests.fakes import Behaviour, ToolCall
from tests.fakes.openai_server import FakeOpenAI
from tests.server import RunningApp
from tests.stream_harness import PRIMARY_TEXT, gateway, prime, threaded_fake

WEATHER = {
    "type": "function",
    "name": "weather",
    "description": "Current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
# The standard sequence of a streamed text answer, as OpenAI documents it.
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with threaded_fake(FakeOpenAI) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake: FakeOpenAI) -> Iterator[RunningApp]:
    with gateway(tmp_path_factory.mktemp("responses"), fake) as running:
        yield running


@pytest.fixture
def client(app: RunningApp, fake: FakeOpenAI) -> openai.OpenAI:
    prime(fake)
    return openai.OpenAI(base_url=app.url + "/v1", api_key="unused", max_retries=0)


def test_text_input(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    response = client.responses.create(
        model="primary", input="Olá!", instructions="Seja breve", max_output_tokens=50
    )
    assert response.status == "completed"
    assert response.output_text == PRIMARY_TEXT
    assert response.model == "primary"
    assert response.usage is not None and response.usage.total_tokens > 0
    [sent] = fake.requests
    assert sent.json["messages"] == [
        {"role": "system", "content": "Seja breve"},
        {"role": "user", "content": "Olá!"},
    ]
    assert sent.json["max_tokens"] == 50


def test_message_input_with_a_function_call_round_trip(
    client: openai.OpenAI, fake: FakeOpenAI
) -> None:
    fake.script(Behaviour(text="", tool_calls=(ToolCall("weather", {"city": "Recife"}),)))
    first = client.responses.create(model="primary", input="Tempo em Recife?", tools=[WEATHER])  # type: ignore[list-item]
    [call] = [item for item in first.output if item.type == "function_call"]
    assert (call.name, json.loads(call.arguments)) == ("weather", {"city": "Recife"})

    second = client.responses.create(
        model="primary",
        input=[
            {"role": "user", "content": "Tempo em Recife?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "31 °C"},
        ],
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert second.output_text == PRIMARY_TEXT
    sent = fake.requests[-1].json["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[2] == {"role": "tool", "tool_call_id": call.call_id, "content": "31 °C"}


def test_a_forced_tool_choice(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="primary",
        input="Tempo?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "weather"},
    )
    assert [item.type for item in response.output] == ["function_call"]


class Forecast(BaseModel):
    city: str
    celsius: int


def test_structured_output(client: openai.OpenAI) -> None:
    parsed = client.responses.parse(model="primary", input="Tempo?", text_format=Forecast)
    assert parsed.output_parsed == Forecast(city="city (fake)", celsius=42)


def test_streamed_text_has_the_standard_event_sequence(client: openai.OpenAI) -> None:
    with client.responses.stream(model="primary", input="Olá!") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    # Deltas collapse to one entry for the comparison; their text is checked below.
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert collapsed == TEXT_EVENTS
    assert final.output_text == PRIMARY_TEXT
    assert final.usage is not None and final.usage.output_tokens > 0
    print("\nevent types the SDK received:", kinds)


def test_streamed_function_call(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.script(Behaviour(text="", tool_calls=(ToolCall("weather", {"city": "Natal"}),)))
    events = list(
        client.responses.create(model="primary", input="Tempo?", tools=[WEATHER], stream=True)  # type: ignore[list-item]
    )
    kinds = [event.type for event in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    done = events[-1].response  # type: ignore[union-attr]
    assert json.loads(done.output[0].arguments) == {"city": "Natal"}  # type: ignore[union-attr]
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_errors_are_the_sdks_exception_classes(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model="primary", input="x", previous_response_id="resp_1")
    with pytest.raises(openai.BadRequestError, match="web_search"):
        client.responses.create(model="primary", input="x", tools=[{"type": "web_search"}])
    fake.model_defaults["primary"] = Behaviour(status=503)
    fake.model_defaults["backup"] = Behaviour(status=503)
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model="primary", input="x")
    fake.model_defaults["primary"] = Behaviour(status=400, error_type="context_length_exceeded")
    fake.model_defaults["backup"] = Behaviour(status=400, error_type="context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="primary", input="x", stream=True)
    assert caught.value.code == "context_length_exceeded"


def test_a_stream_cut_after_its_first_delta_ends_with_response_failed(
    client: openai.OpenAI, fake: FakeOpenAI
) -> None:
    fake.model_defaults["primary"] = Behaviour(text=PRIMARY_TEXT, cut_after=2)
    events = list(client.responses.create(model="primary", input="x", stream=True))
    kinds = [event.type for event in events]
    assert kinds[-2:] == ["error", "response.failed"]
    assert "response.completed" not in kinds
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None


def test_models_and_a_single_model(client: openai.OpenAI, tmp_path: Path) -> None:
    del tmp_path
    assert [m.id for m in client.models.list().data] == ["primary", "backup"]
