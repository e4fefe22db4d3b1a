"""Any OpenAI-compatible `/chat/completions` server (OpenAI, vLLM, Ollama, llama.cpp).

Stop reasons are normalised to the Converse vocabulary (`end_turn`, `tool_use`, `max_tokens`,
…) so callers see one set whatever the provider.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from yarl import URL

from rom_agent.providers.base import (
    ChatRequest,
    ChatResponse,
    ContentBlock,
    ErrorKind,
    ProviderError,
    StopEvent,
    StreamEvent,
    TextBlock,
    TextDelta,
    ToolResultBlock,
    ToolUseBlock,
    ToolUseEvent,
    Usage,
    UsageEvent,
    classify_status,
    parse_retry_after,
)
from rom_agent.providers.http import (
    TRANSPORT_ERRORS,
    SessionHolder,
    call_timeout,
    is_content_filtered,
    is_context_overflow,
    stream_cut,
    stream_timeout,
    transport_error,
)

if TYPE_CHECKING:
    from rom_agent.config import Settings

_STOP_REASONS = {
    "stop": "end_turn",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "length": "max_tokens",
}
# Error codes/types meaning "this model cannot serve this request" whatever the status.
_MODEL_CODES = frozenset(
    {"context_length_exceeded", "content_filter", "model_not_found", "insufficient_quota"}
)
_DONE = b"[DONE]"


class OpenAIProvider:
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

    async def complete(self, request: ChatRequest) -> ChatResponse:
        body = orjson.dumps(encode_request(request, stream=False))
        try:
            async with self._session.get().post(
                self._url, data=body, timeout=call_timeout(request.timeout_s)
            ) as response:
                if response.status != 200:
                    raise await _error_from_response(response)
                raw = await response.read()
        except TRANSPORT_ERRORS as exc:
            raise transport_error(exc, phase="calling openai") from exc
        return decode_response(request.model, raw)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        body = orjson.dumps(encode_request(request, stream=True))
        decoder = StreamDecoder()
        phase = "calling openai"
        try:
            async with self._session.get().post(
                self._url, data=body, timeout=stream_timeout(request.timeout_s)
            ) as response:
                if response.status != 200:
                    raise await _error_from_response(response)
                phase = "reading stream"
                async with aclosing(iter_sse_batches(response.content)) as batches:
                    async for batch in batches:
                        for event in decoder.handle_batch(batch):
                            yield event
                        if decoder.done:
                            # Don't wait for EOF: a server lingering after `[DONE]` must not
                            # delay the answer (the connection is reused if EOF is in already).
                            break
        except TRANSPORT_ERRORS as exc:
            if not decoder.done:  # after [DONE] nothing of the answer can be lost
                raise transport_error(exc, phase=phase) from exc
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise ProviderError(
                ErrorKind.TRANSIENT,
                f"malformed stream chunk: {type(exc).__name__}: {exc}",
                error_type="malformed_stream",
            ) from exc
        if not decoder.done or decoder.stop_reason is None:
            raise stream_cut()
        yield UsageEvent(decoder.usage)
        yield StopEvent(decoder.stop_reason)

    async def aclose(self) -> None:
        await self._session.aclose()


# --------------------------------------------------------------------------- request mapping


def encode_request(request: ChatRequest, *, stream: bool) -> dict[str, Any]:
    """ChatRequest → chat/completions body."""
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    for message in request.messages:
        if message.role == "assistant":
            messages.append(_assistant_message(message.content))
            continue
        # Tool results become `tool` messages; they must directly follow the assistant turn
        # that asked for them, so they go before any text of the same user message.
        texts: list[str] = []
        for block in message.content:
            if isinstance(block, ToolResultBlock):
                messages.append(
                    {"role": "tool", "tool_call_id": block.tool_use_id, "content": block.content}
                )
            elif isinstance(block, TextBlock):
                texts.append(block.text)
        if texts:
            messages.append({"role": "user", "content": "".join(texts)})

    body: dict[str, Any] = {"model": request.model, "messages": messages}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": tool.input_schema,
                },
            }
            for tool in request.tools
        ]
    return body


def _assistant_message(content: tuple[ContentBlock, ...]) -> dict[str, Any]:
    text = "".join(block.text for block in content if isinstance(block, TextBlock))
    calls = [
        {
            "id": block.id,
            "type": "function",
            "function": {"name": block.name, "arguments": orjson.dumps(block.input).decode()},
        }
        for block in content
        if isinstance(block, ToolUseBlock)
    ]
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": calls}


# --------------------------------------------------------------------------- response mapping


def decode_response(model: str, raw: bytes) -> ChatResponse:
    """chat/completions response body → ChatResponse."""
    try:
        data = orjson.loads(raw)
        if "error" in data:  # some servers answer 200 with an error object
            raise _error_from_body(None, data, None)
        choice = data["choices"][0]
        message = choice["message"]
        content: list[ContentBlock] = []
        if message.get("content"):
            content.append(TextBlock(message["content"]))
        for call in message.get("tool_calls") or ():
            function = call["function"]
            content.append(
                ToolUseBlock(call["id"], function["name"], _arguments(function.get("arguments")))
            )
        finish = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise ProviderError(
            ErrorKind.TRANSIENT, "malformed chat completion", error_type="malformed_response"
        ) from exc
    return ChatResponse(model, tuple(content), _stop_reason(finish), _usage(data.get("usage")))


class StreamDecoder:
    """SSE chunks → stream events; tool-call deltas are assembled by their `index`."""

    __slots__ = ("_tools", "done", "stop_reason", "usage")

    def __init__(self) -> None:
        self._tools: dict[int, list[Any]] = {}  # index → [id, name, argument fragments]
        self.done = False  # `[DONE]` seen
        self.stop_reason: str | None = None
        self.usage = Usage()

    def handle(self, chunk: dict[str, Any]) -> list[StreamEvent]:
        if "error" in chunk:
            raise _error_from_body(None, chunk, None)
        if chunk.get("usage"):
            self.usage = _usage(chunk["usage"])
        events: list[StreamEvent] = []
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events.append(TextDelta(delta["content"]))
            for call in delta.get("tool_calls") or ():
                self._tool_delta(call)
            finish = choice.get("finish_reason")
            if finish:
                self.stop_reason = _stop_reason(finish)
                events.extend(
                    ToolUseEvent(ToolUseBlock(tool[0], tool[1], _arguments("".join(tool[2]))))
                    for _, tool in sorted(self._tools.items())
                )
                self._tools.clear()
        return events

    def handle_batch(self, batch: list[bytes]) -> Iterator[StreamEvent]:
        """The events of one network read, consecutive text deltas merged into one.

        When the upstream is ahead of us its chunks arrive together; forwarding them as one
        saves a pipeline step, an SSE frame and a socket write per chunk, as a byte-forwarding
        proxy would. A live model's tokens arrive spaced out and pass one by one. Whatever was
        decoded before a failure is yielded before the failure is raised.
        """
        texts: list[str] = []
        try:
            for data in batch:
                if data == _DONE:
                    self.done = True
                    break
                for event in self.handle(orjson.loads(data)):
                    if isinstance(event, TextDelta):
                        texts.append(event.text)
                        continue
                    if texts:
                        yield TextDelta("".join(texts))
                        texts = []
                    yield event
        except Exception:
            if texts:
                yield TextDelta("".join(texts))
            raise
        if texts:
            yield TextDelta("".join(texts))

    def _tool_delta(self, call: dict[str, Any]) -> None:
        tool = self._tools.get(call.get("index", 0))
        if tool is None:
            tool = self._tools[call.get("index", 0)] = ["", "", []]
        if call.get("id"):
            tool[0] = call["id"]
        function = call.get("function") or {}
        if function.get("name"):
            tool[1] = function["name"]
        if function.get("arguments"):
            tool[2].append(function["arguments"])


def _stop_reason(finish: str | None) -> str:
    if finish == "content_filter":
        raise ProviderError(
            ErrorKind.MODEL,
            "answer blocked by the model's content filter",
            error_type="content_filter",
        )
    return _STOP_REASONS.get(finish or "stop", finish or "end_turn")


def _arguments(raw: str | dict[str, Any] | None) -> dict[str, Any]:
    if isinstance(raw, dict):  # some servers (Ollama) send the object itself
        return raw
    if not raw:
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProviderError(
            ErrorKind.TRANSIENT, "malformed tool call arguments", error_type="malformed_response"
        ) from exc
    return value if isinstance(value, dict) else {"value": value}


def _usage(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    return Usage(int(raw.get("prompt_tokens") or 0), int(raw.get("completion_tokens") or 0))


async def iter_sse_batches(content: aiohttp.StreamReader) -> AsyncIterator[list[bytes]]:
    """The `data` of the server-sent events completed by each network read, whatever the
    chunking (no line-length limit). Batched per read so that events which arrived together
    can travel on together (see `StreamDecoder.handle_batch`)."""
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


async def _error_from_response(response: aiohttp.ClientResponse) -> ProviderError:
    raw = await response.read()
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        data = {"error": raw[:200].decode(errors="replace")}
    return _error_from_body(response.status, data, response.headers)
