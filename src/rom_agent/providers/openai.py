"""Any OpenAI-compatible `/chat/completions` server (OpenAI, vLLM, Ollama, llama.cpp).

The wire format is `openai_wire`'s (shared with the facade); this module is the HTTP call
and the error taxonomy. Stop reasons are normalised to the Converse vocabulary (`end_turn`,
`tool_use`, `max_tokens`, …) so callers see one set whatever the provider.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from yarl import URL

from rom_agent.domain.errors import (
    CONTENT_FILTER,
    CONTEXT_LENGTH_EXCEEDED,
    ErrorKind,
    ProviderError,
)
from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    StopEvent,
    StreamEvent,
    TextDelta,
    ToolUseEvent,
    UsageEvent,
)
from rom_agent.domain.options import GenerationOptions
from rom_agent.providers.base import (
    classify_status,
    parse_retry_after,
)
from rom_agent.providers.openai_request import request_json
from rom_agent.providers.openai_stream import StreamAccumulator
from rom_agent.providers.openai_wire import (
    completion_chars,
    estimate_usage,
    response_of,
    stop_reason_of,
)
from rom_agent.providers.transport import (
    HttpProvider,
    PreparedCall,
    SessionHolder,
    StreamDecoding,
    is_content_filtered,
    is_context_overflow,
    safe_label,
    stream_cut,
)

if TYPE_CHECKING:
    from rom_agent.config import Settings

NO_FINISH = "the stream ended without a finish_reason"
EMPTY_RESPONSE = "empty_response"


def empty_response() -> ProviderError:
    """A 200 without a body: what the server refused it did not say (not the model's health:
    not counted, not retried; falls back)."""
    return ProviderError(
        ErrorKind.MODEL, "openai returned 200 with an empty body", error_type=EMPTY_RESPONSE
    )


DONE_WITHOUT_FINISH = (
    "the upstream ended the stream ([DONE]) without a finish_reason: it stopped generating "
    "before the answer was complete (llama.cpp does this when another request interrupts it)"
)


class OpenAIProvider(HttpProvider):
    """`POST {base_url}/chat/completions`, JSON or SSE. One call, one HTTP request."""

    name = "openai"

    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        self._url = URL(base_url.rstrip("/") + "/chat/completions")
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._session = SessionHolder(headers)

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIProvider:
        if not settings.openai_base_url:
            raise ValueError("OPENAI_BASE_URL is not set")
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        return cls(settings.openai_base_url, key)

    def unsupported(self, options: GenerationOptions) -> list[str]:
        """None: every option is a Chat Completions field, forwarded as is."""
        return []

    async def prepare(self, request: ChatRequest, *, stream: bool) -> PreparedCall:
        return PreparedCall(self._url, orjson.dumps(request_json(request, stream=stream)))

    async def read_error(self, response: aiohttp.ClientResponse) -> ProviderError:
        raw = await response.read()
        try:
            data = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            data = {"error": raw[:200].decode(errors="replace")}
        return _error_from_body(response.status, data, response.headers)

    def decode(self, request: ChatRequest, raw: bytes) -> ChatResponse:
        response = decode_response(request.model, raw)
        if response.usage.total_tokens == 0 and (response.content or request.messages):
            usage = estimate_usage(request, completion_chars(response))
            response = replace(response, usage=usage)
        return response

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """The template's stream, plus one exception to "one call, one request": llama.cpp's
        server answers an over-long *streamed* prompt with an empty 200; the same request
        unstreamed says why (`context_length_exceeded`), so it is asked once, within the same
        attempt budget, and its verdict — or its answer — is this call's."""
        try:
            async for event in super().stream(request):
                yield event
            return
        except ProviderError as error:
            if error.error_type != EMPTY_RESPONSE:
                raise
        response = await self.complete(request)
        if response.text:
            yield TextDelta(response.text)
        for block in response.tool_uses:
            yield ToolUseEvent(block)
        yield UsageEvent(response.usage)
        yield StopEvent(response.stop_reason)

    def stream_decoding(self, request: ChatRequest) -> StreamDecoding:
        return SseDecoding(request)


def decode_response(model: str, raw: bytes) -> ChatResponse:
    """chat/completions response body → ChatResponse."""
    if not raw.strip():
        raise empty_response()
    try:
        data = orjson.loads(raw)
        if isinstance(data, dict) and "error" in data:  # some servers answer 200 with an error
            raise _error_from_body(None, data, None)
        response, finish = response_of(model, data)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise ProviderError(
            ErrorKind.TRANSIENT,
            "malformed chat completion",
            error_type="malformed_response",
            detail=f"{type(exc).__name__}: {exc}",
        ) from exc
    _check_finish(finish)
    return response


def _check_finish(finish: str | None) -> None:
    if finish == "content_filter":
        raise ProviderError(
            ErrorKind.POLICY,
            "the answer was stopped by the model's content filter",
            error_type=CONTENT_FILTER,
        )


class SseDecoding(StreamDecoding):
    """An SSE body of chat.completion.chunk objects (see `openai_stream.StreamAccumulator`).

    The answer is whole once a choice carried its `finish_reason` and the body ended, with or
    without `data: [DONE]` (several servers omit it). `[DONE]` without a finish_reason is a
    cut: the server stopped generating early.
    """

    __slots__ = ("accumulator", "empty", "request")

    def __init__(self, request: ChatRequest) -> None:
        self.request = request
        self.accumulator = StreamAccumulator()
        self.empty = True  # no server-sent event at all

    async def events(self, response: aiohttp.ClientResponse) -> AsyncGenerator[StreamEvent, None]:
        accumulator = self.accumulator
        batches = iter_sse_batches(response.content)
        try:
            async for batch in batches:
                self.empty = False
                for event in accumulator.handle_batch(batch, _in_stream_error):
                    yield event
                if accumulator.finish_reason == "content_filter":
                    _check_finish("content_filter")
                if accumulator.done:
                    # Don't wait for EOF: a server lingering after `[DONE]` must not delay
                    # the answer (the connection is reused if EOF is in already).
                    break
        finally:
            await batches.aclose()

    @property
    def answer_complete(self) -> bool:
        return self.accumulator.finished

    def ending(self) -> list[StreamEvent]:
        accumulator = self.accumulator
        if accumulator.done and not accumulator.finished:
            # Not the model's health: the server chose to stop (llama.cpp interrupts a
            # running stream for a new request). Not retried, not counted; falls back.
            raise ProviderError(ErrorKind.MODEL, DONE_WITHOUT_FINISH, error_type="interrupted")
        if self.empty:
            raise empty_response()
        if not accumulator.finished:
            raise stream_cut(NO_FINISH)
        usage = accumulator.usage
        if not accumulator.saw_usage:
            usage = estimate_usage(self.request, accumulator.text_chars)
        return [UsageEvent(usage), StopEvent(stop_reason_of(accumulator.finish_reason))]


def _in_stream_error(chunk: dict[str, Any]) -> ProviderError:
    return _error_from_body(None, chunk, None)


async def iter_sse_batches(content: aiohttp.StreamReader) -> AsyncGenerator[list[bytes], None]:
    """The `data` of the server-sent events completed by each network read, whatever the
    chunking (no line-length limit). Batched per read so that events which arrived together
    can travel on together (see `StreamAccumulator.handle_batch`)."""
    pending = b""
    data: list[bytes] = []
    async for chunk in content.iter_any():
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        batch: list[bytes] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    batch.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
            # `event:`, `id:`, `retry:` and `:` comments carry nothing we use
        if batch:
            yield batch
    if pending.startswith(b"data:"):  # a last event without its blank line
        data.append(pending[5:].strip())
    if data:
        yield [b"\n".join(data)]


# --------------------------------------------------------------------------- errors

# The error taxonomy reads the upstream's code and type first (OpenAI's `code`, llama.cpp's
# `type`, Azure's inner code), prose only when they say nothing specific (see transport.py).
_CONTEXT_CODES = frozenset(
    {
        "context_length_exceeded",  # OpenAI
        "context_window_exceeded",
        "exceed_context_size_error",  # llama.cpp server
        "model_context_window_exceeded",
    }
)
_POLICY_CODES = frozenset(
    {
        "content_filter",  # Azure OpenAI, prompt refused
        "content_policy_violation",  # OpenAI
        "invalid_prompt",  # OpenAI: prompt flagged as violating the usage policy
        "responsibleaipolicyviolation",  # Azure's inner code
    }
)
_MODEL_CODES = frozenset({"model_not_found", "insufficient_quota", "model_not_available"})
# Codes and types that only restate the status: they leave the decision to the prose.
_GENERIC_CODES = frozenset(
    {
        "invalid_request_error",
        "badrequesterror",  # vLLM
        "bad_request",
        "error",
        "api_error",
        "server_error",
        "internal_server_error",
        "not_found_error",
        "invalid_request",
    }
)


def classify(
    status: int | None, identifiers: list[str], message: str
) -> tuple[ErrorKind, str | None]:
    """(kind, canonical error type or None) from the status, the upstream's codes/types
    (lower-cased) and, last, its prose."""
    names = set(identifiers)
    if names & _CONTEXT_CODES:
        return ErrorKind.MODEL, CONTEXT_LENGTH_EXCEEDED
    if names & _POLICY_CODES:
        return ErrorKind.POLICY, CONTENT_FILTER
    if names & _MODEL_CODES:
        return ErrorKind.MODEL, None
    kind = ErrorKind.TRANSIENT if status is None else classify_status(status)
    if kind is ErrorKind.TRANSIENT or names - _GENERIC_CODES:
        return kind, None  # a specific code we need no prose for (e.g. string_above_max_length)
    if is_context_overflow(message):
        return ErrorKind.MODEL, CONTEXT_LENGTH_EXCEEDED  # vLLM says it only in prose
    if is_content_filtered(message):
        return ErrorKind.POLICY, CONTENT_FILTER
    return kind, None


def _error_fields(data: Any) -> tuple[str, list[Any], int | None]:
    """(message, code/type values, a status carried in the body) of the error shapes seen:
    OpenAI `{"error": {message, type, code}}` (Azure adds `innererror.code`), Anthropic
    `{"type": "error", "error": {type, message}}`, vLLM's top-level
    `{"object": "error", "message", "type", "code": 400}`, Ollama `{"error": "text"}`."""
    if not isinstance(data, dict):
        return "", [], None
    error = data.get("error")
    if isinstance(error, dict):
        inner = error.get("innererror")
        values = [error.get("code"), error.get("type")]
        if isinstance(inner, dict):
            values.append(inner.get("code"))
        body_status = error.get("code") if isinstance(error.get("code"), int) else None
        return str(error.get("message") or ""), values, body_status
    if isinstance(error, str):
        return error, [], None
    if data.get("object") == "error":
        code = data.get("code")
        body_status = code if isinstance(code, int) else None
        return str(data.get("message") or ""), [code, data.get("type")], body_status
    return "", [], None


def _error_from_body(status: int | None, data: Any, headers: Any) -> ProviderError:
    message, values, body_status = _error_fields(data)
    identifiers = [value.lower() for value in values if isinstance(value, str) and value]
    # vLLM in-stream: {"error": {"code": 400, ...}} — the status travels in the body.
    effective_status = status if status is not None else body_status
    kind, canonical = classify(effective_status, identifiers, message)
    retry_after = None
    if headers is not None:
        retry_after = parse_retry_after(headers.get("Retry-After"))
        if retry_after is None and headers.get("retry-after-ms"):
            retry_ms = parse_retry_after(headers.get("retry-after-ms"))
            retry_after = retry_ms / 1000 if retry_ms is not None else None
    label = canonical or next(
        (label for label in map(safe_label, values) if label is not None), "error"
    )
    where = f"openai returned {status}" if status is not None else "openai stream error"
    return ProviderError(
        kind,
        f"{where} ({label})",
        status=status,
        error_type=canonical or label,
        retry_after_s=retry_after,
        detail=message or None,
    )
