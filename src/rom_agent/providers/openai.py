"""Any OpenAI-compatible `/chat/completions` server (OpenAI, vLLM, Ollama, llama.cpp).

The wire format is `openai_wire`'s (shared with the facade); this module is the HTTP call
and the error taxonomy. Stop reasons are normalised to the Converse vocabulary (`end_turn`,
`tool_use`, `max_tokens`, …) so callers see one set whatever the provider.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from yarl import URL

from rom_agent.domain.options import GenerationOptions
from rom_agent.providers.base import (
    ChatRequest,
    ChatResponse,
    ErrorKind,
    ProviderError,
    StopEvent,
    StreamEvent,
    UsageEvent,
    classify_status,
    parse_retry_after,
)
from rom_agent.providers.openai_wire import (
    StreamAccumulator,
    request_json,
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
    stream_cut,
)

if TYPE_CHECKING:
    from rom_agent.config import Settings

# Error codes/types meaning "this model cannot serve this request" whatever the status.
_MODEL_CODES = frozenset(
    {"context_length_exceeded", "content_filter", "model_not_found", "insufficient_quota"}
)
NO_FINISH = "the stream ended without a finish_reason"
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
        return decode_response(request.model, raw)

    def stream_decoding(self, request: ChatRequest) -> StreamDecoding:
        return SseDecoding()


def decode_response(model: str, raw: bytes) -> ChatResponse:
    """chat/completions response body → ChatResponse."""
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
            ErrorKind.MODEL,
            "answer blocked by the model's content filter",
            error_type="content_filter",
        )


class SseDecoding(StreamDecoding):
    """An SSE body of chat.completion.chunk objects (see `openai_wire.StreamAccumulator`).

    The answer is whole once a choice carried its `finish_reason` and the body ended, with or
    without `data: [DONE]` (several servers omit it). `[DONE]` without a finish_reason is a
    cut: the server stopped generating early.
    """

    __slots__ = ("accumulator",)

    def __init__(self) -> None:
        self.accumulator = StreamAccumulator()

    async def events(self, response: aiohttp.ClientResponse) -> AsyncIterator[StreamEvent]:
        accumulator = self.accumulator
        batches = iter_sse_batches(response.content)
        try:
            async for batch in batches:
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
        if not accumulator.finished:
            raise stream_cut(DONE_WITHOUT_FINISH if accumulator.done else NO_FINISH)
        return [UsageEvent(accumulator.usage), StopEvent(stop_reason_of(accumulator.finish_reason))]


def _in_stream_error(chunk: dict[str, Any]) -> ProviderError:
    return _error_from_body(None, chunk, None)


async def iter_sse_batches(content: aiohttp.StreamReader) -> AsyncIterator[list[bytes]]:
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


def classify(
    status: int | None, code: str | None, error_type: str | None, message: str
) -> ErrorKind:
    if code in _MODEL_CODES or error_type in _MODEL_CODES:
        return ErrorKind.MODEL
    kind = ErrorKind.TRANSIENT if status is None else classify_status(status)
    if kind is ErrorKind.REQUEST and (is_context_overflow(message) or is_content_filtered(message)):
        return ErrorKind.MODEL  # vLLM and others say it only in the message
    return kind


def _error_from_body(status: int | None, data: Any, headers: Any) -> ProviderError:
    error = data.get("error") if isinstance(data, dict) else None
    effective_status = status
    if isinstance(error, dict):
        message = str(error.get("message") or "")
        code = error.get("code")
        if status is None and isinstance(code, int):  # vLLM in-stream: {"code": 400, ...}
            effective_status = code
        code = code if isinstance(code, str) else None
        error_type = error.get("type") if isinstance(error.get("type"), str) else None
    else:  # Ollama: {"error": "model 'x' not found"}
        message, code, error_type = str(error or ""), None, None
    retry_after = None
    if headers is not None:
        retry_after = parse_retry_after(headers.get("Retry-After"))
        if retry_after is None and headers.get("retry-after-ms"):
            retry_ms = parse_retry_after(headers.get("retry-after-ms"))
            retry_after = retry_ms / 1000 if retry_ms is not None else None
    label = code or error_type or "error"
    where = f"openai {status}" if status is not None else "openai"
    return ProviderError(
        classify(effective_status, code, error_type, message),
        f"{where} {label}: {message or 'no message'}",
        status=status,
        error_type=code or error_type,
        retry_after_s=retry_after,
    )
