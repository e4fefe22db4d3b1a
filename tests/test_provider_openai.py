"""OpenAIProvider against the fake OpenAI-compatible server over real HTTP."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from rom_agent.domain.errors import (
    ErrorKind,
    ProviderError,
)
from rom_agent.domain.messages import (
    ChatRequest,
    Message,
    StopEvent,
    TextBlock,
    TextDelta,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    ToolUseEvent,
    Usage,
    UsageEvent,
)
from rom_agent.providers.openai import NO_FINISH, OpenAIProvider, iter_sse_batches
from rom_agent.providers.openai_stream import StreamAccumulator
from tests.fakes import (
    BEHAVIOUR_HEADER,
    DUMMY_API_KEY,
    Behaviour,
    ToolCall,
    collect,
    collect_until_error,
    text_of,
)
from tests.fakes.openai_server import FakeOpenAI

# The fake-upstream fixtures (fake_*, *_provider, aws_env, closed_port).
pytest_plugins = ("tests.fakes.fixtures",)

MODEL = "gpt-4o-mini"
REPO = Path(__file__).resolve().parents[1]
WEATHER = ToolSpec(
    "weather",
    "Current weather for a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def ask(text: str = "Hi", **kwargs: Any) -> ChatRequest:
    return ChatRequest(model=MODEL, messages=[Message.text("user", text)], **kwargs)


# --------------------------------------------------------------------------- JSON


async def test_complete_maps_request_and_response(
    openai_provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Behaviour(text="Olá mundo", usage=(30, 4)))
    response = await openai_provider.complete(
        ask("Oi", system="Be brief", max_tokens=64, temperature=0.2)
    )

    assert (response.text, response.stop_reason, response.usage) == (
        "Olá mundo",
        "end_turn",
        Usage(30, 4),
    )
    [sent] = fake_openai.requests
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["Authorization"] == f"Bearer {DUMMY_API_KEY}"
    assert sent.json == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief"},
            {"role": "user", "content": "Oi"},
        ],
        "max_tokens": 64,
        "temperature": 0.2,
    }


async def test_tool_use_round_trip(
    openai_provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(
        Behaviour(text="", tool_calls=(ToolCall("weather", {"city": "Lisboa"}, "call-2"),))
    )
    history = [
        Message.text("user", "Weather in Porto and Lisboa?"),
        Message(
            "assistant",
            (TextBlock("Checking."), ToolUseBlock("call-1", "weather", {"city": "Porto"})),
        ),
        Message("user", (ToolResultBlock("call-1", "18C sunny"), TextBlock("And Lisboa?"))),
    ]
    response = await openai_provider.complete(
        ChatRequest(model=MODEL, messages=history, tools=[WEATHER])
    )

    assert response.content == (ToolUseBlock("call-2", "weather", {"city": "Lisboa"}),)
    assert response.stop_reason == "tool_use"
    sent = fake_openai.requests[0].json
    assert sent["messages"][1:] == [
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call-1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Porto"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call-1", "content": "18C sunny"},
        {"role": "user", "content": "And Lisboa?"},
    ]
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "Current weather for a city",
                "parameters": WEATHER.input_schema,
            },
        }
    ]


async def test_missing_usage_is_estimated_never_zero(
    openai_provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    """llama.cpp ignores `include_usage`: the usage is estimated (4 characters a token, rounded
    up) and flagged, so no client records zero tokens for generated text."""
    text = "Hello from the fake upstream."  # 29 characters: 8 tokens
    fake_openai.script([Behaviour(text=text, usage=None), Behaviour(text=text, usage=None)])
    prompt = "Tell me something nice"  # 22 characters: 6 tokens
    estimated = Usage(6, 8, estimated=True)
    assert (await openai_provider.complete(ask(prompt))).usage == estimated
    assert UsageEvent(estimated) in await collect(openai_provider.stream(ask(prompt)))


async def test_reported_usage_is_not_estimated(
    openai_provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script([Behaviour(usage=(30, 4)), Behaviour(usage=(30, 4))])
    assert (await openai_provider.complete(ask())).usage == Usage(30, 4)
    assert UsageEvent(Usage(30, 4)) in await collect(openai_provider.stream(ask()))


# --------------------------------------------------------------------------- SSE


async def test_stream_text(openai_provider: OpenAIProvider, fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Behaviour(text="One two three", usage=(9, 3)))
    events = await collect(openai_provider.stream(ask()))

    # However the chunks were grouped by the network: all the text, then usage, then stop.
    assert text_of(events) == "One two three"
    assert all(isinstance(e, TextDelta) for e in events[:-2])
    assert events[-2:] == [UsageEvent(Usage(9, 3)), StopEvent("end_turn")]
    [sent] = fake_openai.requests
    assert sent.json["stream"] is True
    assert sent.json["stream_options"] == {"include_usage": True}


async def test_stream_assembles_tool_calls_by_index(
    openai_provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    calls = (
        ToolCall("weather", {"city": "Lisboa", "units": "metric"}, "call-1"),
        ToolCall("weather", {"city": "Porto"}, "call-2"),
    )
    fake_openai.script(Behaviour(text="Let me check.", tool_calls=calls))
    events = await collect(openai_provider.stream(ask(tools=[WEATHER])))

    assert text_of(events) == "Let me check."
    assert [e for e in events if isinstance(e, ToolUseEvent)] == [
        ToolUseEvent(ToolUseBlock("call-1", "weather", {"city": "Lisboa", "units": "metric"})),
        ToolUseEvent(ToolUseBlock("call-2", "weather", {"city": "Porto"})),
    ]
    assert events[-1] == StopEvent("tool_use")


class _Chunks:
    """Stands in for aiohttp's StreamReader: just `iter_any()`."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk


async def test_sse_parser_handles_any_chunking() -> None:
    wire = (
        b": keep-alive comment\r\n\r\n"
        b'event: message\r\ndata: {"a": 1}\r\n\r\n'
        b"data: first line\ndata: second line\n\n"
        b"data:[DONE]"  # no space, no trailing blank line
    )
    expected = [b'{"a": 1}', b"first line\nsecond line", b"[DONE]"]
    for size in (1, 2, 5, len(wire)):
        chunks = [wire[i : i + size] for i in range(0, len(wire), size)]
        batches = [b async for b in iter_sse_batches(_Chunks(chunks))]  # type: ignore[arg-type]
        assert [data for batch in batches for data in batch] == expected, size
        assert all(batches), "no empty batches"


def _sse_chunk(text: str) -> bytes:
    return orjson.dumps({"choices": [{"index": 0, "delta": {"content": text}}]})


def test_text_that_arrived_together_travels_together() -> None:
    decoder = StreamAccumulator()
    together = list(decoder.handle_batch([_sse_chunk("One"), _sse_chunk(" two")]))
    apart = [*decoder.handle_batch([_sse_chunk(" three")]), *decoder.handle_batch([b"[DONE]"])]
    assert together == [TextDelta("One two")]
    assert apart == [TextDelta(" three")]
    assert decoder.done


def test_text_decoded_before_a_bad_chunk_is_delivered_first() -> None:
    events = StreamAccumulator().handle_batch([_sse_chunk("One"), _sse_chunk(" two"), b"{broken"])
    assert next(events) == TextDelta("One two")
    with pytest.raises(orjson.JSONDecodeError):
        next(events)


# --------------------------------------------------------------------------- errors

HTTP_ERRORS = [
    pytest.param(500, None, "oops", ErrorKind.TRANSIENT, id="500"),
    pytest.param(502, None, "bad gateway", ErrorKind.TRANSIENT, id="502"),
    pytest.param(503, None, "overloaded", ErrorKind.TRANSIENT, id="503"),
    pytest.param(400, None, "bad field", ErrorKind.REQUEST, id="400"),
    pytest.param(
        400,
        "context_length_exceeded",
        "This model's maximum context length is 8192 tokens",
        ErrorKind.MODEL,
        id="context-length",
    ),
    pytest.param(
        400,
        None,
        "This model's maximum context length is 4096 tokens. However, you requested 5000",
        ErrorKind.MODEL,
        id="context-length-vllm",
    ),
    pytest.param(400, "content_filter", "filtered", ErrorKind.POLICY, id="content-filter"),
    pytest.param(404, "model_not_found", "no such model", ErrorKind.MODEL, id="model-not-found"),
    pytest.param(401, "invalid_api_key", "bad key", ErrorKind.MODEL, id="401"),
    pytest.param(403, None, "denied", ErrorKind.MODEL, id="403"),
    pytest.param(429, "insufficient_quota", "no credit left", ErrorKind.MODEL, id="quota"),
]


@pytest.mark.parametrize("streaming", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("status", "code", "message", "kind"), HTTP_ERRORS)
async def test_http_errors_are_classified(
    openai_provider: OpenAIProvider,
    fake_openai: FakeOpenAI,
    streaming: bool,
    status: int,
    code: str | None,
    message: str,
    kind: ErrorKind,
) -> None:
    fake_openai.script(Behaviour(status=status, error_type=code, message=message))
    error = await _failure(openai_provider, streaming)

    assert error.kind is kind
    assert error.status == status
    if "context length" in message:
        assert error.error_type == "context_length_exceeded"
    else:
        assert error.error_type == (code or error.error_type)  # the code, else the error type
    assert error.error_type
    # The upstream's words go to the log (detail), never into the client-facing message.
    assert error.detail == message
    assert message not in error.message
    assert error.message == f"openai returned {status} ({error.error_type})"
    assert fake_openai.request_count == 1


@pytest.mark.parametrize("streaming", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("retry_after", [None, 2], ids=["no-retry-after", "retry-after"])
async def test_rate_limit_is_transient_with_retry_after(
    openai_provider: OpenAIProvider,
    fake_openai: FakeOpenAI,
    streaming: bool,
    retry_after: int | None,
) -> None:
    fake_openai.script(
        Behaviour(status=429, error_type="rate_limit_exceeded", retry_after=retry_after)
    )
    error = await _failure(openai_provider, streaming)
    assert (error.kind, error.status, error.error_type) == (
        ErrorKind.TRANSIENT,
        429,
        "rate_limit_exceeded",
    )
    assert error.retry_after_s == retry_after
    assert fake_openai.request_count == 1


async def test_in_stream_error_is_transient(
    openai_provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Behaviour(text="a b c", stream_error_after=1, message="engine died"))
    events, error = await collect_until_error(openai_provider.stream(ask()))
    assert events == [TextDelta("a")]
    assert error.kind is ErrorKind.TRANSIENT
    assert error.detail == "engine died"
    assert error.message == "openai stream error (server_error)"


@pytest.mark.parametrize("streaming", [False, True], ids=["json", "stream"])
async def test_content_filter_finish_is_a_policy_error(
    openai_provider: OpenAIProvider, fake_openai: FakeOpenAI, streaming: bool
) -> None:
    fake_openai.script(Behaviour(text="", stop_reason="content_filter"))
    error = await _failure(openai_provider, streaming)
    assert (error.kind, error.error_type) == (ErrorKind.POLICY, "content_filter")


@pytest.mark.parametrize("streaming", [False, True], ids=["json", "stream"])
async def test_connection_refused_is_transient(closed_port: int, streaming: bool) -> None:
    provider = OpenAIProvider(f"http://127.0.0.1:{closed_port}/v1")
    try:
        error = await _failure(provider, streaming)
    finally:
        await provider.aclose()
    assert error.kind is ErrorKind.TRANSIENT
    # The message may reach a client: it names what failed, never the upstream's address.
    assert error.message.endswith("could not connect to the upstream")
    assert "127.0.0.1" not in error.message and str(closed_port) not in error.message


@pytest.mark.parametrize("streaming", [False, True], ids=["json", "stream"])
async def test_connection_reset_is_transient_and_not_retried(
    openai_provider: OpenAIProvider, fake_openai: FakeOpenAI, streaming: bool
) -> None:
    fake_openai.script(Behaviour(reset=True))
    error = await _failure(openai_provider, streaming)
    assert error.kind is ErrorKind.TRANSIENT
    assert fake_openai.request_count == 1


async def test_cut_stream_fails_after_the_chunks_it_got(
    openai_provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Behaviour(text="one two three", cut_after=2))
    events, error = await collect_until_error(openai_provider.stream(ask()))
    assert text_of(events) == "one two"
    assert all(isinstance(e, TextDelta) for e in events)
    assert error.kind is ErrorKind.TRANSIENT


async def test_stream_without_done_is_not_a_clean_end(
    openai_provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Behaviour(text="one two", missing_terminator=True))
    events, error = await collect_until_error(openai_provider.stream(ask()))
    assert text_of(events) == "one two"
    assert not any(isinstance(e, StopEvent) for e in events)
    assert (error.kind, error.message) == (ErrorKind.TRANSIENT, NO_FINISH)


async def test_stream_with_finish_reason_but_no_done_is_complete(
    openai_provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Behaviour(text="one two", usage=(5, 2), omit_done=True))
    events = await collect(openai_provider.stream(ask()))
    assert text_of(events) == "one two"
    assert events[-2:] == [UsageEvent(Usage(5, 2)), StopEvent("end_turn")]


async def test_stalled_stream_times_out(
    openai_provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Behaviour(text="one two", stall_after=1))
    events, error = await collect_until_error(openai_provider.stream(ask(timeout_s=0.3)))
    assert events == [TextDelta("one")]
    assert (error.kind, error.error_type) == (ErrorKind.TRANSIENT, "timeout")


async def test_malformed_chunk_is_transient(
    openai_provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Behaviour(text="one two", malformed_after=1))
    events, error = await collect_until_error(openai_provider.stream(ask()))
    assert events == [TextDelta("one")]
    assert (error.kind, error.error_type) == (ErrorKind.TRANSIENT, "malformed_stream")


async def test_malformed_body_is_transient(
    openai_provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Behaviour(malformed_after=0))
    with pytest.raises(ProviderError) as caught:
        await openai_provider.complete(ask())
    assert (caught.value.kind, caught.value.error_type) == (
        ErrorKind.TRANSIENT,
        "malformed_response",
    )


async def test_slow_first_byte_times_out(
    openai_provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Behaviour(first_byte_delay_s=5))
    with pytest.raises(ProviderError) as caught:
        await openai_provider.complete(ask(timeout_s=0.3))
    assert (caught.value.kind, caught.value.error_type) == (ErrorKind.TRANSIENT, "timeout")
    assert fake_openai.request_count == 1


# --------------------------------------------------------------------------- the fake itself


async def test_fake_is_remotely_scriptable(fake_openai: FakeOpenAI) -> None:
    url = f"{fake_openai.url}/v1/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as session:
        directive = orjson.dumps({"status": 503, "retry_after": 1}).decode()
        async with session.post(url, json=body, headers={BEHAVIOUR_HEADER: directive}) as r:
            assert (r.status, r.headers["Retry-After"]) == (503, "1")
        async with session.post(
            f"{fake_openai.url}/_fake/script", json=[{"status": 429}, {"text": "scripted"}]
        ) as r:
            assert (await r.json())["queued"] == 2
        async with session.post(url, json=body) as r:
            assert r.status == 429
        async with session.post(url, json=body) as r:
            assert (await r.json())["choices"][0]["message"]["content"] == "scripted"
        async with session.get(f"{fake_openai.url}/_fake/stats") as r:
            stats = await r.json()
    assert stats["requests"] == 3
    assert stats["by_path"] == {"/v1/chat/completions": 3}


async def test_fake_runs_as_a_process(closed_port: int) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakes.openai_server",
        "--port",
        str(closed_port),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        banner = await asyncio.wait_for(process.stdout.readline(), timeout=20)
        assert f"127.0.0.1:{closed_port}" in banner.decode()
        provider = OpenAIProvider(f"http://127.0.0.1:{closed_port}/v1")
        try:
            assert (await provider.complete(ask())).text == Behaviour().text
        finally:
            await provider.aclose()
    finally:
        process.terminate()
        await process.wait()


async def _failure(provider: OpenAIProvider, streaming: bool) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        if streaming:
            await collect(provider.stream(ask()))
        else:
            await provider.complete(ask())
    return caught.value
