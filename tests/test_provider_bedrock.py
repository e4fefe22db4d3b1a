"""BedrockProvider against the fake Bedrock runtime over real HTTP (no mocks of the client)."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from typing import Any

import orjson
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials, RefreshableCredentials
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer

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
from rom_agent.providers.bedrock import BedrockProvider
from tests.fakes import TEST_REGION, Behaviour, ToolCall, collect, collect_until_error, text_of
from tests.fakes.bedrock_server import FakeBedrock, encode_frame, exception_frame

# The fake-upstream fixtures (fake_*, *_provider, aws_env, closed_port).
pytest_plugins = ("tests.fakes.fixtures",)

MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"
WEATHER = ToolSpec(
    "weather",
    "Current weather for a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def ask(text: str = "Hi", **kwargs: Any) -> ChatRequest:
    return ChatRequest(model=MODEL, messages=[Message.text("user", text)], **kwargs)


# --------------------------------------------------------------------------- the fake's encoder


def test_frame_encoder_is_read_by_botocore() -> None:
    headers = {":event-type": "contentBlockDelta", ":message-type": "event"}
    payload = orjson.dumps({"delta": {"text": "olá"}})
    frames = encode_frame(headers, payload) + exception_frame("throttlingException", "slow")
    buffer = EventStreamBuffer()
    for i in range(0, len(frames), 7):  # arbitrary chunking, as off the socket
        buffer.add_data(frames[i : i + 7])
    first, second = list(buffer)
    assert first.headers == headers
    assert first.payload == payload
    assert second.headers[":exception-type"] == "throttlingException"
    assert orjson.loads(second.payload) == {"message": "slow"}


def test_fake_malformed_frame_fails_the_crc() -> None:
    buffer = EventStreamBuffer()
    buffer.add_data(FakeBedrock().malformed_item())
    with pytest.raises(ChecksumMismatch):
        next(buffer)


# --------------------------------------------------------------------------- Converse


async def test_complete_maps_request_and_response(
    bedrock_provider: BedrockProvider, fake_bedrock: FakeBedrock
) -> None:
    fake_bedrock.script(Behaviour(text="Olá mundo", usage=(30, 4)))
    response = await bedrock_provider.complete(
        ask("Oi", system="Be brief", max_tokens=64, temperature=0.2)
    )

    assert response.text == "Olá mundo"
    assert response.stop_reason == "end_turn"
    assert response.usage == Usage(30, 4)
    assert response.model == MODEL
    [sent] = fake_bedrock.requests
    assert sent.path == f"/model/{MODEL}/converse"
    assert sent.json == {
        "messages": [{"role": "user", "content": [{"text": "Oi"}]}],
        "system": [{"text": "Be brief"}],
        "inferenceConfig": {"maxTokens": 64, "temperature": 0.2},
    }


async def test_tool_use_round_trip(
    bedrock_provider: BedrockProvider, fake_bedrock: FakeBedrock
) -> None:
    fake_bedrock.script(
        Behaviour(text="", tool_calls=(ToolCall("weather", {"city": "Lisboa"}, "tu-2"),))
    )
    history = [
        Message.text("user", "Weather in Porto and Lisboa?"),
        Message(
            "assistant",
            (TextBlock("Checking."), ToolUseBlock("tu-1", "weather", {"city": "Porto"})),
        ),
        Message("user", (ToolResultBlock("tu-1", "18C sunny"),)),
    ]
    response = await bedrock_provider.complete(
        ChatRequest(model=MODEL, messages=history, tools=[WEATHER])
    )

    assert response.tool_uses == (ToolUseBlock("tu-2", "weather", {"city": "Lisboa"}),)
    assert response.stop_reason == "tool_use"
    sent = fake_bedrock.requests[0].json
    assert sent["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"text": "Checking."},
                {"toolUse": {"toolUseId": "tu-1", "name": "weather", "input": {"city": "Porto"}}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "toolResult": {
                        "toolUseId": "tu-1",
                        "content": [{"text": "18C sunny"}],
                        "status": "success",
                    }
                }
            ],
        },
    ]
    assert sent["toolConfig"] == {
        "tools": [
            {
                "toolSpec": {
                    "name": "weather",
                    "description": "Current weather for a city",
                    "inputSchema": {"json": WEATHER.input_schema},
                }
            }
        ]
    }


async def test_tool_blocks_become_text_when_tools_are_withdrawn(
    bedrock_provider: BedrockProvider, fake_bedrock: FakeBedrock
) -> None:
    history = [
        Message("assistant", (ToolUseBlock("tu-1", "weather", {"city": "Porto"}),)),
        Message("user", (ToolResultBlock("tu-1", "boom", is_error=True),)),
    ]
    await bedrock_provider.complete(ChatRequest(model=MODEL, messages=history))

    sent = fake_bedrock.requests[0].json
    assert "toolConfig" not in sent
    assert sent["messages"] == [
        {"role": "assistant", "content": [{"text": '[tool call weather: {"city":"Porto"}]'}]},
        {"role": "user", "content": [{"text": "[tool error: boom]"}]},
    ]


async def test_usage_defaults_to_zero(
    bedrock_provider: BedrockProvider, fake_bedrock: FakeBedrock
) -> None:
    fake_bedrock.script([Behaviour(usage=None), Behaviour(usage=None)])
    assert (await bedrock_provider.complete(ask())).usage == Usage(0, 0)
    events = await collect(bedrock_provider.stream(ask()))
    assert UsageEvent(Usage(0, 0)) in events


# --------------------------------------------------------------------------- SigV4


async def test_requests_are_sigv4_signed_for_bedrock(
    bedrock_provider: BedrockProvider, fake_bedrock: FakeBedrock
) -> None:
    await bedrock_provider.complete(ask())
    await collect(bedrock_provider.stream(ask()))

    for sent in fake_bedrock.requests:
        authorization = sent.headers["Authorization"]
        date = sent.headers["X-Amz-Date"]
        assert authorization.startswith(
            f"AWS4-HMAC-SHA256 Credential=test/{date[:8]}/{TEST_REGION}/bedrock/aws4_request, "
        )
        # The model id's ':' travels percent-encoded, exactly as it was signed.
        assert sent.raw_path.startswith("/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/")
        assert _signature(authorization) == _expected_signature(fake_bedrock.url, sent)


def _signature(authorization: str) -> str:
    return authorization.rpartition("Signature=")[2]


def _expected_signature(base_url: str, sent: Any) -> str:
    """Re-sign what the server received with the same dummy key: proves the wire matches."""
    signed = _field(sent.headers["Authorization"], "SignedHeaders").split(";")
    lowered = {name.lower(): value for name, value in sent.headers.items()}
    request = AWSRequest(
        method=sent.method,
        url=base_url + sent.raw_path,
        data=sent.body,
        headers={name: lowered[name] for name in signed},
    )
    request.context["timestamp"] = lowered["x-amz-date"]
    signer = SigV4Auth(ReadOnlyCredentials("test", "test", None), "bedrock", TEST_REGION)
    canonical = signer.canonical_request(request)
    return signer.signature(signer.string_to_sign(request, canonical), request)


def _field(authorization: str, name: str) -> str:
    for part in authorization.split(", "):
        if part.startswith(name + "="):
            return part.partition("=")[2]
    raise AssertionError(name)


async def test_refreshable_credentials_are_refreshed_off_the_loop(
    fake_bedrock: FakeBedrock,
) -> None:
    now = dt.datetime.now(dt.UTC)

    def metadata(key: str, expiry: dt.datetime) -> dict[str, str]:
        return {
            "access_key": key,
            "secret_key": "dummy-secret",
            "token": "dummy-session-token",
            "expiry_time": expiry.isoformat(),
        }

    refreshed_in: list[int] = []

    def refresh() -> dict[str, str]:  # blocking I/O in real life (STS, IMDS, SSO)
        refreshed_in.append(threading.get_ident())
        return metadata("refreshed-key", now + dt.timedelta(hours=1))

    credentials = RefreshableCredentials.create_from_metadata(
        metadata("stale-key", now - dt.timedelta(minutes=1)), refresh, "test"
    )
    provider = BedrockProvider(
        region=TEST_REGION, endpoint_url=fake_bedrock.url, credentials_resolver=lambda: credentials
    )
    try:
        await provider.complete(ask())
        await provider.complete(ask())
    finally:
        await provider.aclose()

    assert len(refreshed_in) == 1  # once, then cached until it nears expiry again
    assert refreshed_in[0] != threading.get_ident()
    for sent in fake_bedrock.requests:
        assert "Credential=refreshed-key/" in sent.headers["Authorization"]
        assert sent.headers["X-Amz-Security-Token"] == "dummy-session-token"


async def test_missing_credentials_is_a_model_error_without_a_request(
    fake_bedrock: FakeBedrock,
) -> None:
    provider = BedrockProvider(
        region=TEST_REGION, endpoint_url=fake_bedrock.url, credentials_resolver=lambda: None
    )
    with pytest.raises(ProviderError) as caught:
        await provider.complete(ask())
    assert caught.value.kind is ErrorKind.MODEL
    assert fake_bedrock.request_count == 0
    await provider.aclose()


# --------------------------------------------------------------------------- ConverseStream


async def test_stream_text(bedrock_provider: BedrockProvider, fake_bedrock: FakeBedrock) -> None:
    fake_bedrock.script(Behaviour(text="One two three four", usage=(9, 4)))
    events = await collect(bedrock_provider.stream(ask()))

    assert events == [
        TextDelta("One"),
        TextDelta(" two"),
        TextDelta(" three"),
        TextDelta(" four"),
        UsageEvent(Usage(9, 4)),
        StopEvent("end_turn"),
    ]
    [sent] = fake_bedrock.requests
    assert sent.path == f"/model/{MODEL}/converse-stream"


async def test_stream_assembles_tool_use(
    bedrock_provider: BedrockProvider, fake_bedrock: FakeBedrock
) -> None:
    calls = (
        ToolCall("weather", {"city": "Lisboa", "units": "metric"}, "tu-1"),
        ToolCall("weather", {"city": "Porto"}, "tu-2"),
    )
    fake_bedrock.script(Behaviour(text="Let me check.", tool_calls=calls))
    events = await collect(bedrock_provider.stream(ask(tools=[WEATHER])))

    assert text_of(events) == "Let me check."
    assert [e for e in events if isinstance(e, ToolUseEvent)] == [
        ToolUseEvent(ToolUseBlock("tu-1", "weather", {"city": "Lisboa", "units": "metric"})),
        ToolUseEvent(ToolUseBlock("tu-2", "weather", {"city": "Porto"})),
    ]
    assert events[-1] == StopEvent("tool_use")


# --------------------------------------------------------------------------- errors

HTTP_ERRORS = [
    pytest.param(429, "ThrottlingException", "Too many requests", ErrorKind.TRANSIENT, id="429"),
    pytest.param(500, "InternalServerException", "oops", ErrorKind.TRANSIENT, id="500"),
    pytest.param(503, "ServiceUnavailableException", "busy", ErrorKind.TRANSIENT, id="503"),
    pytest.param(424, "ModelErrorException", "model fail", ErrorKind.TRANSIENT, id="model-error"),
    pytest.param(408, "ModelTimeoutException", "slow", ErrorKind.TRANSIENT, id="model-timeout"),
    pytest.param(
        429, "ModelNotReadyException", "warming", ErrorKind.TRANSIENT, id="model-not-ready"
    ),
    pytest.param(400, "ValidationException", "bad field", ErrorKind.REQUEST, id="validation"),
    pytest.param(
        400,
        "ValidationException",
        "Input is too long for requested model.",
        ErrorKind.MODEL,
        id="context-length",
    ),
    pytest.param(
        400,
        "ValidationException",
        "prompt is too long: 210000 tokens > 200000 maximum",
        ErrorKind.MODEL,
        id="context-length-anthropic",
    ),
    pytest.param(
        400,
        "ValidationException",
        "Output blocked by content filtering policy",
        ErrorKind.POLICY,
        id="content-filter",
    ),
    pytest.param(
        400,
        "ValidationException",
        "The provided model identifier is invalid.",
        ErrorKind.MODEL,
        id="bad-model-id",
    ),
    pytest.param(404, "ResourceNotFoundException", "no model", ErrorKind.MODEL, id="not-found"),
    pytest.param(403, "AccessDeniedException", "denied", ErrorKind.MODEL, id="access-denied"),
    pytest.param(401, None, "who are you", ErrorKind.MODEL, id="401"),
    pytest.param(502, None, "bad gateway", ErrorKind.TRANSIENT, id="502-no-type"),
]


@pytest.mark.parametrize("streaming", [False, True], ids=["converse", "stream"])
@pytest.mark.parametrize(("status", "error_type", "message", "kind"), HTTP_ERRORS)
async def test_http_errors_are_classified(
    bedrock_provider: BedrockProvider,
    fake_bedrock: FakeBedrock,
    streaming: bool,
    status: int,
    error_type: str | None,
    message: str,
    kind: ErrorKind,
) -> None:
    if error_type is None:  # a bare proxy error, no Bedrock header
        fake_bedrock.script(Behaviour(status=status, error_type="", message=message))
    else:
        fake_bedrock.script(Behaviour(status=status, error_type=error_type, message=message))

    error = await _failure(bedrock_provider, streaming)

    assert error.kind is kind
    assert error.status == status
    canonical = {ErrorKind.POLICY: "content_filter"}.get(kind)
    if "too long" in message:
        canonical = "context_length_exceeded"
    assert error.error_type == (canonical or error_type or None)
    # The upstream's words go to the log (detail), never into the client-facing message.
    assert error.detail == message
    assert message not in error.message
    assert error.message.startswith(f"bedrock returned {status} (")
    assert error.retry_after_s is None
    assert fake_bedrock.request_count == 1


@pytest.mark.parametrize("streaming", [False, True], ids=["converse", "stream"])
async def test_throttling_keeps_retry_after(
    bedrock_provider: BedrockProvider, fake_bedrock: FakeBedrock, streaming: bool
) -> None:
    fake_bedrock.script(Behaviour(status=429, retry_after=2))
    error = await _failure(bedrock_provider, streaming)
    assert (error.kind, error.error_type, error.retry_after_s) == (
        ErrorKind.TRANSIENT,
        "ThrottlingException",
        2.0,
    )
    assert fake_bedrock.request_count == 1


STREAM_EXCEPTIONS = [
    ("throttlingException", "slow down", ErrorKind.TRANSIENT),
    ("modelStreamErrorException", "stream broke", ErrorKind.TRANSIENT),
    ("internalServerException", "oops", ErrorKind.TRANSIENT),
    ("serviceUnavailableException", "busy", ErrorKind.TRANSIENT),
    ("modelTimeoutException", "slow", ErrorKind.TRANSIENT),
    ("validationException", "bad field", ErrorKind.REQUEST),
    ("validationException", "too many input tokens", ErrorKind.MODEL),
]


@pytest.mark.parametrize(("error_type", "message", "kind"), STREAM_EXCEPTIONS)
async def test_in_stream_exceptions_are_classified(
    bedrock_provider: BedrockProvider,
    fake_bedrock: FakeBedrock,
    error_type: str,
    message: str,
    kind: ErrorKind,
) -> None:
    fake_bedrock.script(
        Behaviour(text="a b c", stream_error_after=2, error_type=error_type, message=message)
    )
    events, error = await collect_until_error(bedrock_provider.stream(ask()))

    assert events == [TextDelta("a"), TextDelta(" b")]
    canonical = "context_length_exceeded" if "tokens" in message else error_type
    assert (error.kind, error.error_type, error.status) == (kind, canonical, None)
    assert error.detail == message and message not in error.message
    assert fake_bedrock.request_count == 1


@pytest.mark.parametrize("streaming", [False, True], ids=["converse", "stream"])
@pytest.mark.parametrize("stop_reason", ["content_filtered", "guardrail_intervened"])
async def test_content_filtered_answer_is_a_policy_error(
    bedrock_provider: BedrockProvider, fake_bedrock: FakeBedrock, streaming: bool, stop_reason: str
) -> None:
    fake_bedrock.script(Behaviour(text="", stop_reason=stop_reason))
    error = await _failure(bedrock_provider, streaming)
    assert (error.kind, error.error_type) == (ErrorKind.POLICY, "content_filter")


@pytest.mark.parametrize("streaming", [False, True], ids=["converse", "stream"])
async def test_connection_refused_is_transient(
    aws_env: None, closed_port: int, streaming: bool
) -> None:
    provider = BedrockProvider(region=TEST_REGION, endpoint_url=f"http://127.0.0.1:{closed_port}")
    try:
        error = await _failure(provider, streaming)
    finally:
        await provider.aclose()
    assert error.kind is ErrorKind.TRANSIENT
    assert error.error_type is not None


@pytest.mark.parametrize("streaming", [False, True], ids=["converse", "stream"])
async def test_connection_reset_is_transient_and_not_retried(
    bedrock_provider: BedrockProvider, fake_bedrock: FakeBedrock, streaming: bool
) -> None:
    fake_bedrock.script(Behaviour(reset=True))
    error = await _failure(bedrock_provider, streaming)
    assert error.kind is ErrorKind.TRANSIENT
    assert fake_bedrock.request_count == 1


async def test_cut_stream_fails_after_the_chunks_it_got(
    bedrock_provider: BedrockProvider, fake_bedrock: FakeBedrock
) -> None:
    fake_bedrock.script(Behaviour(text="one two three", cut_after=2))
    events, error = await collect_until_error(bedrock_provider.stream(ask()))
    assert events == [TextDelta("one"), TextDelta(" two")]
    assert error.kind is ErrorKind.TRANSIENT
    assert fake_bedrock.request_count == 1


async def test_stream_without_message_stop_is_not_a_clean_end(
    bedrock_provider: BedrockProvider, fake_bedrock: FakeBedrock
) -> None:
    fake_bedrock.script(Behaviour(text="one two", missing_terminator=True))
    events, error = await collect_until_error(bedrock_provider.stream(ask()))
    assert text_of(events) == "one two"
    assert not any(isinstance(e, StopEvent) for e in events)
    assert (error.kind, error.message) == (
        ErrorKind.TRANSIENT,
        "the stream ended without messageStop",
    )


async def test_stream_without_metadata_after_message_stop_is_complete(
    bedrock_provider: BedrockProvider, fake_bedrock: FakeBedrock
) -> None:
    fake_bedrock.script(Behaviour(text="one two", omit_done=True))
    events = await collect(bedrock_provider.stream(ask()))
    assert text_of(events) == "one two"
    assert events[-1] == StopEvent("end_turn")


async def test_stalled_stream_times_out(
    bedrock_provider: BedrockProvider, fake_bedrock: FakeBedrock
) -> None:
    fake_bedrock.script(Behaviour(text="one two", stall_after=1))
    events, error = await collect_until_error(bedrock_provider.stream(ask(timeout_s=0.3)))
    assert events == [TextDelta("one")]
    assert (error.kind, error.error_type) == (ErrorKind.TRANSIENT, "timeout")


async def test_malformed_frame_is_transient(
    bedrock_provider: BedrockProvider, fake_bedrock: FakeBedrock
) -> None:
    fake_bedrock.script(Behaviour(text="one two", malformed_after=1))
    events, error = await collect_until_error(bedrock_provider.stream(ask()))
    assert events == [TextDelta("one")]
    assert (error.kind, error.error_type) == (ErrorKind.TRANSIENT, "malformed_stream")


async def test_slow_answer_times_out(
    bedrock_provider: BedrockProvider, fake_bedrock: FakeBedrock
) -> None:
    fake_bedrock.script(Behaviour(first_byte_delay_s=5))
    with pytest.raises(ProviderError) as caught:
        await bedrock_provider.complete(ask(timeout_s=0.3))
    assert (caught.value.kind, caught.value.error_type) == (ErrorKind.TRANSIENT, "timeout")
    assert fake_bedrock.request_count == 1


async def test_malformed_converse_body_is_transient(
    bedrock_provider: BedrockProvider, fake_bedrock: FakeBedrock
) -> None:
    fake_bedrock.script(Behaviour(malformed_after=0))
    with pytest.raises(ProviderError) as caught:
        await bedrock_provider.complete(ask())
    assert (caught.value.kind, caught.value.error_type) == (
        ErrorKind.TRANSIENT,
        "malformed_response",
    )


# --------------------------------------------------------------------------- pooling


async def test_concurrent_streams_are_not_queued_behind_a_pool(
    bedrock_provider: BedrockProvider, fake_bedrock: FakeBedrock
) -> None:
    # Held long enough that all 150 are in flight together even on a loaded 2-core machine.
    fake_bedrock.default = Behaviour(delay_s=2.0)
    results = await asyncio.gather(*(collect(bedrock_provider.stream(ask())) for _ in range(150)))
    assert all(events[-1] == StopEvent("end_turn") for events in results)
    assert fake_bedrock.max_in_flight == 150  # aiohttp's default pool would cap this at 100


async def test_aclose_is_idempotent(bedrock_provider: BedrockProvider) -> None:
    await bedrock_provider.complete(ask())
    await bedrock_provider.aclose()
    await bedrock_provider.aclose()


async def _failure(provider: BedrockProvider, streaming: bool) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        if streaming:
            await collect(provider.stream(ask()))
        else:
            await provider.complete(ask())
    return caught.value
