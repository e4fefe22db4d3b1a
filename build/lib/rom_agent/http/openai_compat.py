"""OpenAI-compatible facade: `POST /v1/chat/completions` and `GET /v1/models`.

A gateway route: the client's messages and tools go to the model through the same admission,
fallback, retry and breaker as `/api/chat`, and tool calls come back to the client, which runs
them (OpenAI semantics). Nothing is stored: OpenAI clients send the whole history each time.
Errors use OpenAI's shape so the official SDKs raise their usual exceptions.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Send

from rom_agent.http.admission import admit
from rom_agent.http.errors import ApiError, invalid, openai_error_payload, to_api_error
from rom_agent.http.requests import check_api_key, parse_json_object, read_body
from rom_agent.http.services import Services, services_of
from rom_agent.http.streaming import PermitStream
from rom_agent.logs import get_logger
from rom_agent.providers.base import (
    ChatResponse,
    ContentBlock,
    Message,
    ModelRef,
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
from rom_agent.resilience.faults import parse_fault_plan
from rom_agent.resilience.pipeline import ModelCall, StreamStart

router = APIRouter()
log = get_logger("rom_agent.http.openai_compat")

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "tool_calls": "tool_calls",
    "max_tokens": "length",
    "length": "length",
    "content_filtered": "content_filter",
    "content_filter": "content_filter",
    "guardrail_intervened": "content_filter",
}


def finish_reason(stop_reason: str) -> str:
    return _FINISH_REASONS.get(stop_reason, "stop")


def completion_id() -> str:
    return "chatcmpl-" + os.urandom(12).hex()


# --------------------------------------------------------------------------- request mapping


def _text_of(content: Any, where: str, max_chars: int) -> str:
    """OpenAI message content: a string, or a list of parts of which we take the text; at
    most `max_chars` (MAX_MESSAGE_CHARS) per message, as on `/api/chat`."""
    text = _content_text(content, where)
    if len(text) > max_chars:
        raise invalid(f"{where}: content exceeds {max_chars} characters")
    return text


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid(f"{where}: only text content parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"{where}: a text part needs a string 'text'")
            texts.append(text)
        return "".join(texts)
    raise invalid(f"{where}: content must be a string or a list of parts")


def _tool_uses(calls: Any, where: str) -> list[ContentBlock]:
    if not isinstance(calls, list):
        raise invalid(f"{where}: tool_calls must be a list")
    blocks: list[ContentBlock] = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid(f"{where}: each tool call needs function.name")
        try:
            arguments = orjson.loads(function.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            raise invalid(f"{where}: function.arguments must be a JSON string") from None
        blocks.append(ToolUseBlock(str(call.get("id", "")), function["name"], arguments))
    return blocks


def parse_messages(raw: Any, max_chars: int) -> tuple[str | None, list[Message]]:
    """OpenAI messages → (system prompt, our messages). Tool results join one user turn."""
    if not isinstance(raw, list) or not raw:
        raise invalid("'messages' must be a non-empty list")
    system: list[str] = []
    messages: list[Message] = []
    pending_results: list[ContentBlock] = []

    def flush_results() -> None:
        if pending_results:
            messages.append(Message("user", tuple(pending_results)))
            pending_results.clear()

    for index, item in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise invalid(f"{where} must be an object")
        role = item.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(item.get("content"), where, max_chars))
        elif role == "tool":
            result = _text_of(item.get("content"), where, max_chars)
            pending_results.append(ToolResultBlock(str(item.get("tool_call_id", "")), result))
        elif role == "user":
            flush_results()
            text = _text_of(item.get("content"), where, max_chars)
            messages.append(Message("user", (TextBlock(text),)))
        elif role == "assistant":
            flush_results()
            blocks: list[ContentBlock] = []
            text = _text_of(item.get("content"), where, max_chars)
            if text:
                blocks.append(TextBlock(text))
            if item.get("tool_calls"):
                blocks.extend(_tool_uses(item["tool_calls"], where))
            messages.append(Message("assistant", tuple(blocks)))
        else:
            raise invalid(f"{where}: unknown role {role!r}")
    flush_results()
    if not messages:
        raise invalid("'messages' needs at least one user message")
    return ("\n\n".join(system) or None), messages


def parse_tools(raw: Any) -> tuple[ToolSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise invalid("'tools' must be a list")
    specs = []
    for index, tool in enumerate(raw):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid(f"tools[{index}]: needs function.name")
        specs.append(
            ToolSpec(
                function["name"],
                str(function.get("description", "")),
                function.get("parameters") or {"type": "object", "properties": {}},
            )
        )
    return tuple(specs)


def parse_chain(data: dict[str, Any], services: Services) -> tuple[ModelRef, ...]:
    model = data.get("model")
    fallbacks = data.get("fallbacks")
    if model is not None and not isinstance(model, str):
        raise invalid("'model' must be a string")
    if fallbacks is not None and (
        not isinstance(fallbacks, list) or not all(isinstance(f, str) for f in fallbacks)
    ):
        raise invalid("'fallbacks' must be a list of model ids")
    try:
        return services.pipeline.chain_for(model, fallbacks)
    except ValueError as exc:
        raise ApiError(400, "INVALID_REQUEST", str(exc)) from None


def _number(data: dict[str, Any], key: str, kind: type, low: float, high: float) -> Any:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise invalid(f"'{key}' must be a number between {low} and {high}")
    return kind(value)


def build_call(data: dict[str, Any], services: Services, fault_header: str | None) -> ModelCall:
    settings = services.flags.current
    system, messages = parse_messages(data.get("messages"), settings.max_message_chars)
    max_tokens = _number(data, "max_completion_tokens", int, 1, 1_000_000) or _number(
        data, "max_tokens", int, 1, 1_000_000
    )
    last_text = messages[-1].plain_text
    try:
        fault = parse_fault_plan(last_text, fault_header, settings)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    return ModelCall(
        messages=messages,
        chain=parse_chain(data, services),
        deadline=services.pipeline.new_deadline(),
        system=system,
        tools=parse_tools(data.get("tools")),
        fault=fault,
        max_tokens=max_tokens,
        temperature=_number(data, "temperature", float, 0, 2),
    )


# --------------------------------------------------------------------------- responses


def _tool_call_json(block: ToolUseBlock, index: int | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {
        "id": block.id,
        "type": "function",
        "function": {"name": block.name, "arguments": orjson.dumps(block.input).decode()},
    }
    if index is not None:
        call["index"] = index
    return call


def _usage_json(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
    }


def completion_body(response: ChatResponse, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": response.text or None}
    tool_uses = response.tool_uses
    if tool_uses:
        message["tool_calls"] = [_tool_call_json(block) for block in tool_uses]
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason(response.stop_reason),
                "logprobs": None,
            }
        ],
        "usage": _usage_json(response.usage),
    }


def _error_response(error: ApiError) -> Response:
    return Response(
        orjson.dumps(openai_error_payload(error)),
        status_code=error.status,
        headers=error.headers,
        media_type="application/json",
    )


def _api_error(exc: Exception) -> ApiError:
    """`to_api_error`, logging the failures nobody anticipated (they become a bare 500).
    Call it from an `except` block."""
    error = to_api_error(exc)
    if error.code == "INTERNAL":
        log.exception("completion failed", error=type(exc).__name__)
    return error


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    services = services_of(request)
    created = int(services.started_wall)
    data = [
        {"id": ref.id, "object": "model", "created": created, "owned_by": ref.provider}
        for ref in services.chain
    ]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    services = services_of(request)
    try:
        check_api_key(request, services)
        raw = await read_body(request, services.flags.current.max_body_bytes)
        permit = await admit(request, services.bottleneck)
    except Exception as exc:
        return _error_response(_api_error(exc))
    streaming = False
    try:
        data = parse_json_object(raw)
        call = build_call(data, services, request.headers.get("x-fault"))
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise invalid("'stream' must be a boolean")
        if stream:
            options = data.get("stream_options") or {}
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            streaming = True
            return CompletionStream(completion_chunks(services, call, include_usage), permit)
        result = await services.pipeline.complete(call)
        body = completion_body(result.response, result.model.id)
        return Response(orjson.dumps(body), media_type="application/json")
    except Exception as exc:
        return _error_response(_api_error(exc))
    finally:
        if not streaming:
            permit.release()


def _chunk(
    cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None
) -> bytes:
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


class CompletionStream(PermitStream):
    """The streamed completion, with its status line held back until the commit point.

    Nothing is sent before the pipeline has a first chunk, so a failure before it (chain
    exhausted, every breaker open, a rejected request) is still an ordinary HTTP error in
    OpenAI's shape — the SDKs raise their usual `APIStatusError` subclass from `create()` —
    instead of a 200 whose body is an error.
    """

    async def stream_response(self, send: Send) -> None:
        try:
            first = await anext(self.events)
        except Exception as exc:
            error = _error_response(_api_error(exc))
            await send(
                {
                    "type": "http.response.start",
                    "status": error.status_code,
                    "headers": error.raw_headers,
                }
            )
            await send({"type": "http.response.body", "body": error.body, "more_body": False})
            return
        await super().stream_response(send, first)


async def completion_chunks(
    services: Services, call: ModelCall, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    """OpenAI chunks of one streamed completion; `[DONE]` only after a clean end.

    A failure before the first chunk is retried or falls back inside the pipeline, and if the
    chain still fails it propagates from the first `anext()` (see `CompletionStream`). One
    after the first chunk becomes an error chunk and the stream closes without `[DONE]`, so
    no client mistakes a cut answer for a complete one.
    """
    cid, created = completion_id(), int(time.time())
    items = services.pipeline.stream(call)
    try:
        start = await anext(items)  # the commit point; pipeline errors propagate from here
        assert isinstance(start, StreamStart), "a committed stream starts with StreamStart"
        model = start.model.id
        # The role chunk rides with the first content chunk (which follows StreamStart at
        # once): one write instead of two. Likewise the finish, usage and [DONE] below.
        head = _chunk(cid, created, model, {"role": "assistant", "content": ""})
        usage = Usage()
        stop_reason = "end_turn"
        tool_index = 0
        try:
            async for item in items:
                if isinstance(item, TextDelta):
                    yield head + _chunk(cid, created, model, {"content": item.text})
                    head = b""
                elif isinstance(item, ToolUseEvent):
                    delta = {"tool_calls": [_tool_call_json(item.tool_use, tool_index)]}
                    tool_index += 1
                    yield head + _chunk(cid, created, model, delta)
                    head = b""
                elif isinstance(item, UsageEvent):
                    usage = item.usage
                elif isinstance(item, StopEvent):
                    stop_reason = item.stop_reason
        except Exception as exc:
            yield head + b"data: " + orjson.dumps(openai_error_payload(_api_error(exc))) + b"\n\n"
            return
        tail = [head, _chunk(cid, created, model, {}, finish_reason(stop_reason))]
        if include_usage:
            body = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": _usage_json(usage),
            }
            tail.append(b"data: " + orjson.dumps(body) + b"\n\n")
        tail.append(b"data: [DONE]\n\n")
        yield b"".join(tail)
    finally:
        await items.aclose()
