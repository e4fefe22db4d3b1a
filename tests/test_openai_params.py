"""Every Chat Completions parameter is passed on, mapped (Bedrock Converse) or refused with a
400 naming it and the model — never dropped. Real `openai` SDK → real gateway (uvicorn) →
real fake upstreams, which honour the parameters (tests/fakes/honour.py), so a parameter
dropped on the way shows in the answer too.

One gateway serves the module: chain `openai/primary, bedrock/claude`; a request picks its
own chain with `model` and `fallbacks`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from pydantic import BaseModel

from tests.fakes import Behaviour
from tests.fakes.bedrock_server import FakeBedrock
from tests.fakes.openai_server import FakeOpenAI
from tests.server import RunningApp
from tests.stream_harness import gateway, threaded_fake

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
HI = [{"role": "user", "content": "Hello there. How are you?"}]
OPENAI_ONLY: dict[str, Any] = {"model": "primary", "extra_body": {"fallbacks": []}}
BEDROCK_ONLY: dict[str, Any] = {"model": "claude", "extra_body": {"fallbacks": []}}


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeOpenAI, FakeBedrock]]:
    with threaded_fake(FakeOpenAI) as oai, threaded_fake(FakeBedrock) as bedrock:
        yield oai, bedrock


@pytest.fixture(scope="module")
def app(
    tmp_path_factory: pytest.TempPathFactory, upstreams: tuple[FakeOpenAI, FakeBedrock]
) -> Iterator[RunningApp]:
    oai, bedrock = upstreams
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "test")
        env.setenv("AWS_SECRET_ACCESS_KEY", "test")
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        env.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        with gateway(
            tmp_path_factory.mktemp("params"),
            oai,
            model_chain="openai/primary,bedrock/claude",
            aws_region="us-east-1",
            bedrock_endpoint_url=bedrock.url,
        ) as running:
            yield running


@pytest.fixture
def client(app: RunningApp, upstreams: tuple[FakeOpenAI, FakeBedrock]) -> openai.OpenAI:
    for fake in upstreams:
        fake.reset()
        fake.default = Behaviour(text="Sunny today. Rain tomorrow.")
    return openai.OpenAI(base_url=app.url + "/v1", api_key="unused", max_retries=0)


def sent_openai(upstreams: tuple[FakeOpenAI, FakeBedrock]) -> dict[str, Any]:
    [request] = upstreams[0].requests
    body: dict[str, Any] = request.json
    return body


def sent_bedrock(upstreams: tuple[FakeOpenAI, FakeBedrock]) -> dict[str, Any]:
    [request] = upstreams[1].requests
    body: dict[str, Any] = request.json
    return body


# --------------------------------------------------------------------------- passed (OpenAI)

PASSED = [
    pytest.param({"stop": ["Rain"]}, {"stop": ["Rain"]}, id="stop"),
    pytest.param({"top_p": 0.5}, {"top_p": 0.5}, id="top_p"),
    pytest.param({"seed": 7}, {"seed": 7}, id="seed"),
    pytest.param({"presence_penalty": 0.5}, {"presence_penalty": 0.5}, id="presence_penalty"),
    pytest.param({"frequency_penalty": -1}, {"frequency_penalty": -1}, id="frequency_penalty"),
    pytest.param({"logit_bias": {"50256": -100}}, {"logit_bias": {"50256": -100}}, id="logit_bias"),
    pytest.param({"user": "u-1"}, {"user": "u-1"}, id="user"),
    pytest.param({"max_completion_tokens": 9}, {"max_tokens": 9}, id="max_completion_tokens"),
    pytest.param({"temperature": 0.3}, {"temperature": 0.3}, id="temperature"),
    pytest.param({"n": 1}, {}, id="n=1"),
    pytest.param({"reasoning_effort": "low"}, {"reasoning_effort": "low"}, id="reasoning_effort"),
    pytest.param(
        {"tools": [WEATHER], "parallel_tool_calls": False},
        {"parallel_tool_calls": False},
        id="parallel_tool_calls",
    ),
    pytest.param(
        {"tools": [WEATHER], "tool_choice": "required"},
        {"tool_choice": "required"},
        id="tool_choice",
    ),
    pytest.param(
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_object"}},
        id="response_format",
    ),
]


@pytest.mark.parametrize(("params", "expected"), PASSED)
def test_parameters_reach_an_openai_compatible_upstream(
    client: openai.OpenAI,
    upstreams: tuple[FakeOpenAI, FakeBedrock],
    params: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    client.chat.completions.create(messages=HI, **OPENAI_ONLY, **params)  # type: ignore[call-overload]
    body = sent_openai(upstreams)
    assert {key: body.get(key) for key in expected} == expected


def test_stop_cuts_the_answer(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(messages=HI, stop=["Rain"], **OPENAI_ONLY)
    assert answer.choices[0].message.content == "Sunny today. "


def test_a_forced_tool_choice_yields_that_tool_call(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "weather"}}
    answer = client.chat.completions.create(
        messages=HI,
        tools=[WEATHER],
        tool_choice=choice,
        **OPENAI_ONLY,  # type: ignore[arg-type]
    )
    [call] = answer.choices[0].message.tool_calls or []
    assert call.function.name == "weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "city (fake)"}  # type: ignore[union-attr]


class Forecast(BaseModel):
    city: str
    celsius: int


def test_structured_output_with_a_json_schema(client: openai.OpenAI) -> None:
    parsed = client.chat.completions.parse(messages=HI, response_format=Forecast, **OPENAI_ONLY)
    assert parsed.choices[0].message.parsed == Forecast(city="city (fake)", celsius=42)


# --------------------------------------------------------------------------- mapped (Bedrock)

MAPPED = [
    pytest.param({"stop": ["Rain"]}, ("inferenceConfig", "stopSequences"), ["Rain"], id="stop"),
    pytest.param({"top_p": 0.5}, ("inferenceConfig", "topP"), 0.5, id="top_p"),
    pytest.param({"temperature": 0.3}, ("inferenceConfig", "temperature"), 0.3, id="temperature"),
    pytest.param({"max_tokens": 9}, ("inferenceConfig", "maxTokens"), 9, id="max_tokens"),
    pytest.param({"user": "u-1"}, ("requestMetadata", "user"), "u-1", id="user"),
    pytest.param(
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "weather"}}},
        ("toolConfig", "toolChoice"),
        {"tool": {"name": "weather"}},
        id="tool_choice-named",
    ),
    pytest.param(
        {"tools": [WEATHER], "tool_choice": "required"},
        ("toolConfig", "toolChoice"),
        {"any": {}},
        id="tool_choice-required",
    ),
    pytest.param(
        {"tools": [WEATHER], "tool_choice": "none"}, ("toolConfig",), None, id="tool_choice-none"
    ),
]


@pytest.mark.parametrize(("params", "path", "expected"), MAPPED)
def test_parameters_are_mapped_onto_converse(
    client: openai.OpenAI,
    upstreams: tuple[FakeOpenAI, FakeBedrock],
    params: dict[str, Any],
    path: tuple[str, ...],
    expected: Any,
) -> None:
    client.chat.completions.create(messages=HI, **BEDROCK_ONLY, **params)
    value: Any = sent_bedrock(upstreams)
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    assert value == expected


def test_bedrock_honours_stop_and_forced_tools_end_to_end(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(messages=HI, stop="Rain", **BEDROCK_ONLY)
    assert answer.choices[0].message.content == "Sunny today. "
    choice = {"type": "function", "function": {"name": "weather"}}
    answer = client.chat.completions.create(
        messages=HI,
        tools=[WEATHER],
        tool_choice=choice,
        **BEDROCK_ONLY,  # type: ignore[arg-type]
    )
    assert [c.function.name for c in answer.choices[0].message.tool_calls or []] == ["weather"]  # type: ignore[union-attr]


# --------------------------------------------------------------------------- refused

REFUSED_BY_BEDROCK = [
    pytest.param({"seed": 7}, "seed", id="seed"),
    pytest.param({"presence_penalty": 0.5}, "presence_penalty", id="presence_penalty"),
    pytest.param({"frequency_penalty": 0.5}, "frequency_penalty", id="frequency_penalty"),
    pytest.param({"logit_bias": {"1": 1}}, "logit_bias", id="logit_bias"),
    pytest.param(
        {"response_format": {"type": "json_object"}}, "response_format", id="response_format"
    ),
    pytest.param(
        {"tools": [WEATHER], "parallel_tool_calls": False},
        "parallel_tool_calls",
        id="parallel_tool_calls",
    ),
    pytest.param({"reasoning_effort": "low"}, "reasoning_effort", id="reasoning_effort"),
]


@pytest.mark.parametrize(("params", "name"), REFUSED_BY_BEDROCK)
def test_what_converse_cannot_honour_is_refused_naming_parameter_and_model(
    client: openai.OpenAI,
    upstreams: tuple[FakeOpenAI, FakeBedrock],
    params: dict[str, Any],
    name: str,
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(messages=HI, **BEDROCK_ONLY, **params)
    message = caught.value.message
    assert f"'{name}'" in message and "claude" in message and "bedrock" in message
    assert caught.value.status_code == 400
    assert upstreams[0].request_count == upstreams[1].request_count == 0


def test_a_fallback_that_cannot_honour_a_parameter_refuses_it_up_front(
    client: openai.OpenAI, upstreams: tuple[FakeOpenAI, FakeBedrock]
) -> None:
    """The configured chain (primary, then claude on Bedrock): a `seed` the fallback could
    not honour is refused before the primary is called, not dropped if it falls back."""
    with pytest.raises(openai.BadRequestError, match="'seed' is not supported by model claude"):
        client.chat.completions.create(model="primary", messages=HI, seed=7)
    assert upstreams[0].request_count == 0


REFUSED_ALWAYS = [
    pytest.param({"n": 2}, "'n'", id="n>1"),
    pytest.param({"logprobs": True}, "logprobs", id="logprobs"),
    pytest.param({"top_logprobs": 2}, "top_logprobs", id="top_logprobs"),
    pytest.param({"modalities": ["text", "audio"]}, "modalities", id="modalities"),
    pytest.param({"extra_body": {"frobnicate": 1}}, "frobnicate", id="unknown"),
    pytest.param({"max_tokens": 1.5}, "max_tokens", id="max_tokens-not-integer"),
    pytest.param({"top_p": 3}, "top_p", id="top_p-out-of-range"),
]


@pytest.mark.parametrize(("params", "fragment"), REFUSED_ALWAYS)
def test_what_nothing_behind_the_gateway_can_honour_is_refused(
    client: openai.OpenAI,
    upstreams: tuple[FakeOpenAI, FakeBedrock],
    params: dict[str, Any],
    fragment: str,
) -> None:
    extra = {**OPENAI_ONLY["extra_body"], **params.pop("extra_body", {})}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="primary", messages=HI, extra_body=extra, **params)
    assert fragment in caught.value.message
    assert upstreams[0].request_count == 0


def test_neutral_values_of_unsupported_features_are_accepted(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        messages=HI, logprobs=False, modalities=["text"], **OPENAI_ONLY
    )
    assert answer.choices[0].message.content
