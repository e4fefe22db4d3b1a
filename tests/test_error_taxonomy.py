"""The error taxonomy on real upstream error bodies: the provider's code/type first, prose last.

Each body below is what that server actually sends (as reported in public issue trackers and
the providers' documentation), served verbatim over HTTP by the fake upstreams. The defect this
guards (issue 12 #6): OpenAI's `string_above_max_length` says "string too long", and the old
phrase list took every "too long" for a context-window overflow — a request error every model
would refuse walked the whole chain and ended as a 502.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from rom_agent.domain.errors import (
    ErrorKind,
    ProviderError,
)
from rom_agent.providers.bedrock import BedrockProvider
from rom_agent.providers.openai import OpenAIProvider
from rom_agent.resilience.errors import (
    CONTENT_FILTER,
    CONTEXT_LENGTH,
    INVALID_REQUEST,
    MODEL_ERROR,
    failure_reason,
)
from tests.fakes import Behaviour, collect
from tests.fakes.bedrock_server import FakeBedrock
from tests.fakes.openai_server import FakeOpenAI
from tests.test_provider_openai import ask

pytest_plugins = ("tests.fakes.fixtures",)


def body(value: Any) -> str:
    return orjson.dumps(value).decode()


OPENAI_STRING_TOO_LONG = body(
    {
        "error": {
            "message": "Invalid 'messages[0].content': string too long. Expected a string with "
            "maximum length 10485760, but got a string with length 10485761 instead.",
            "type": "invalid_request_error",
            "param": "messages[0].content",
            "code": "string_above_max_length",
        }
    }
)
OPENAI_CONTEXT = body(
    {
        "error": {
            "message": "This model's maximum context length is 4097 tokens. However, your "
            "messages resulted in 4294 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
)
# vLLM's OpenAI-compatible server: the error at the top level, the status as `code`.
VLLM_CONTEXT = body(
    {
        "object": "error",
        "message": "This model's maximum context length is 6048 tokens. However, you requested "
        "6616 tokens (568 in the messages, 6048 in the completion). Please reduce the length "
        "of the messages or completion.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
)
VLLM_BAD_MAX_TOKENS = body(
    {
        "object": "error",
        "message": "max_tokens must be at least 1, got -186.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
)
# Anthropic's error shape (as relayed by OpenAI-compatible gateways in front of Claude).
ANTHROPIC_CONTEXT = body(
    {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "prompt is too long: 205000 tokens > 200000 maximum",
        },
    }
)
ANTHROPIC_OVERLOADED = body(
    {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
)
# Azure OpenAI refusing the prompt for its content management policy.
AZURE_CONTENT_FILTER = body(
    {
        "error": {
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's "
            "content management policy. Please modify your prompt and retry.",
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": {"sexual": {"filtered": True, "severity": "high"}},
            },
        }
    }
)
# llama.cpp's server: a specific `type`, the status as `code`.
LLAMA_CPP_CONTEXT = body(
    {
        "error": {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 5000,
            "n_ctx": 4096,
        }
    }
)
OLLAMA_NOT_FOUND = body({"error": "model 'llama9' not found, try pulling it first"})

OPENAI_BODIES = [
    pytest.param(
        400, OPENAI_STRING_TOO_LONG, ErrorKind.REQUEST, INVALID_REQUEST, id="openai-string-too-long"
    ),
    pytest.param(400, OPENAI_CONTEXT, ErrorKind.MODEL, CONTEXT_LENGTH, id="openai-context"),
    pytest.param(400, VLLM_CONTEXT, ErrorKind.MODEL, CONTEXT_LENGTH, id="vllm-context"),
    pytest.param(400, VLLM_BAD_MAX_TOKENS, ErrorKind.REQUEST, INVALID_REQUEST, id="vllm-bad-param"),
    pytest.param(400, ANTHROPIC_CONTEXT, ErrorKind.MODEL, CONTEXT_LENGTH, id="anthropic-context"),
    pytest.param(
        529, ANTHROPIC_OVERLOADED, ErrorKind.TRANSIENT, "error", id="anthropic-overloaded"
    ),
    pytest.param(
        400, AZURE_CONTENT_FILTER, ErrorKind.POLICY, CONTENT_FILTER, id="azure-content-filter"
    ),
    pytest.param(400, LLAMA_CPP_CONTEXT, ErrorKind.MODEL, CONTEXT_LENGTH, id="llama.cpp-context"),
    pytest.param(404, OLLAMA_NOT_FOUND, ErrorKind.MODEL, MODEL_ERROR, id="ollama-not-found"),
]


@pytest.mark.parametrize(("status", "raw", "kind", "reason"), OPENAI_BODIES)
async def test_real_openai_compatible_error_bodies(
    openai_provider: OpenAIProvider,
    fake_openai: FakeOpenAI,
    status: int,
    raw: str,
    kind: ErrorKind,
    reason: str,
) -> None:
    fake_openai.script(Behaviour(status=status, error_body=raw))
    with pytest.raises(ProviderError) as caught:
        await openai_provider.complete(ask())
    error = caught.value
    assert (error.kind, failure_reason(error)) == (kind, reason)
    # The client-facing message is ours; the upstream's words are for the log only.
    upstream_message = orjson.loads(raw).get("error", orjson.loads(raw))
    text = (
        upstream_message.get("message") if isinstance(upstream_message, dict) else upstream_message
    )
    assert error.detail == text
    assert text not in error.message
    assert error.message.startswith(f"openai returned {status} (")


BEDROCK_BODIES = [
    # Bedrock's own words for a prompt over the window, and Anthropic's through Bedrock.
    pytest.param(
        "ValidationException",
        "Input is too long for requested model.",
        ErrorKind.MODEL,
        CONTEXT_LENGTH,
        id="bedrock-context",
    ),
    pytest.param(
        "ValidationException",
        "The model returned the following errors: prompt is too long: 200049 tokens > 200000 "
        "maximum",
        ErrorKind.MODEL,
        CONTEXT_LENGTH,
        id="bedrock-anthropic-context",
    ),
    pytest.param(
        "ValidationException",
        "1 validation error detected: Value 'abc' at 'inferenceConfig.maxTokens' failed to "
        "satisfy constraint: Member must satisfy regular expression pattern: [0-9]+",
        ErrorKind.REQUEST,
        INVALID_REQUEST,
        id="bedrock-bad-field",
    ),
    pytest.param(
        "ValidationException",
        "This model doesn't support tool use in streaming mode.",
        ErrorKind.MODEL,
        MODEL_ERROR,
        id="bedrock-model-lacks-feature",
    ),
    pytest.param(
        "ThrottlingException",
        "Too many requests, please wait before trying again.",
        ErrorKind.TRANSIENT,
        "rate_limited",
        id="bedrock-throttled",
    ),
]


@pytest.mark.parametrize(("error_type", "message", "kind", "reason"), BEDROCK_BODIES)
@pytest.mark.parametrize("streaming", [False, True], ids=["converse", "stream"])
async def test_real_bedrock_error_bodies(
    bedrock_provider: BedrockProvider,
    fake_bedrock: FakeBedrock,
    streaming: bool,
    error_type: str,
    message: str,
    kind: ErrorKind,
    reason: str,
) -> None:
    status = 429 if error_type == "ThrottlingException" else 400
    fake_bedrock.script(Behaviour(status=status, error_type=error_type, message=message))
    with pytest.raises(ProviderError) as caught:
        if streaming:
            await collect(bedrock_provider.stream(ask()))
        else:
            await bedrock_provider.complete(ask())
    error = caught.value
    assert (error.kind, failure_reason(error)) == (kind, reason)
    assert error.detail == message and message not in error.message


async def test_an_empty_200_stream_asks_once_unstreamed_for_the_reason(
    openai_provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    """llama.cpp answers an over-long streamed prompt with an empty 200; the unstreamed
    request says `context_length_exceeded`: the call fails with that (not a cut stream,
    which would be retried and counted against a healthy server)."""
    fake_openai.script(
        [Behaviour(empty_body=True), Behaviour(status=400, error_body=LLAMA_CPP_CONTEXT)]
    )
    with pytest.raises(ProviderError) as caught:
        await collect(openai_provider.stream(ask()))
    assert (caught.value.kind, failure_reason(caught.value)) == (ErrorKind.MODEL, CONTEXT_LENGTH)
    assert [r.json.get("stream") for r in fake_openai.requests] == [True, None]


async def test_done_without_finish_reason_says_so_and_is_not_the_models_health(
    openai_provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(Behaviour(text="one two", done_without_finish=True))
    with pytest.raises(ProviderError) as caught:
        await collect(openai_provider.stream(ask()))
    error = caught.value
    assert error.kind is ErrorKind.MODEL  # not counted by the breaker, not retried
    assert "[DONE]" in error.message and "finish_reason" in error.message
