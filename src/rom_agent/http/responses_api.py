"""OpenAI's Responses API: `POST /v1/responses`, on the same pipeline as every chat route.

Text or message input, function tools, structured output (`text.format`), usage, and
`stream: true` with the standard event sequence (`response.created` … `response.completed`).
The same admission, fallback, retry, breakers, parameter checks and error shape as
`/v1/chat/completions` (whose helpers this module reuses). Nothing is stored: a
`previous_response_id` or `conversation` is refused, as is any field the gateway cannot honour.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from rom_agent.domain.options import GenerationOptions, ResponseFormat
from rom_agent.http.errors import invalid
from rom_agent.http.openai_compat import (
    Answer,
    _api_error,
    check_options,
    parse_chain,
    serve_admitted,
    stream_flag,
)
from rom_agent.http.services import Services
from rom_agent.providers.base import (
    ChatResponse,
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
from rom_agent.providers.openai_request import UnsupportedParameter, _integer, tool_choice_of
from rom_agent.providers.openai_wire import (
    TurnBuilder,
    WireFormatError,
    limited_text,
    tool_use_of,
)
from rom_agent.resilience.faults import parse_fault_plan
from rom_agent.resilience.pipeline import ModelCall, StreamStart

# Fields and what the gateway does with them (docs/openai.md). Anything else is refused.
_HANDLED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "stream",
        "stream_options",
        "max_output_tokens",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "text",
        "user",
        "metadata",
        "store",  # accepted; nothing is stored either way (documented)
        "fallbacks",
    }
)
_PASSTHROUGH = {"safety_identifier", "prompt_cache_key", "service_tier"}
_REFUSED = {
    "previous_response_id": "responses are not stored; send the whole conversation as input",
    "conversation": "conversations are not stored; send the whole conversation as input",
    "background": "background responses are not supported",
    "prompt": "stored prompts are not supported",
    "max_tool_calls": "'max_tool_calls' is not supported",
    "top_logprobs": "log probabilities are not returned by this gateway",
    "reasoning": "reasoning options are not supported",
}
_NEUTRAL = {"truncation": "disabled", "include": [], "background": False}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(12).hex()}"


# --------------------------------------------------------------------------- request


def parse_input(raw: Any, max_chars: int) -> tuple[list[str], list[Message]]:
    """`input` → (system texts, messages). Function calls join the assistant turn they belong
    to; their outputs join one user turn, as tool results do on every other route."""
    if isinstance(raw, str):
        raw = [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise invalid("'input' must be a non-empty string or list of items")
    turns = TurnBuilder()
    messages = turns.messages
    for index, item in enumerate(raw):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise invalid(f"{where} must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            try:
                text = limited_text(item, where, max_chars)
            except WireFormatError as exc:
                raise invalid(str(exc)) from None
            if role in ("system", "developer"):
                turns.system.append(text)
            elif role in ("user", "assistant"):
                turns.add(Message(role, (TextBlock(text),)))
            else:
                raise invalid(f"{where}: unknown role {role!r}")
        elif kind == "function_call":
            turns.flush()
            call = {
                "id": item.get("call_id"),
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            try:
                block = tool_use_of(call, where)
            except WireFormatError as exc:
                raise invalid(str(exc)) from None
            if messages and messages[-1].role == "assistant":
                last = messages.pop()
                messages.append(Message("assistant", (*last.content, block)))
            else:
                messages.append(Message("assistant", (block,)))
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                raise invalid(f"{where}: 'output' must be a string")
            turns.add_result(ToolResultBlock(str(item.get("call_id") or ""), output))
        else:
            raise invalid(f"{where}: input items of type {kind!r} are not supported")
    turns.flush()
    if not messages:
        raise invalid("'input' needs at least one user message")
    return turns.system, messages


def parse_tools(raw: Any) -> tuple[ToolSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise invalid("'tools' must be a list")
    specs = []
    for index, tool in enumerate(raw):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise UnsupportedParameter("tools", f"tools[{index}]: {kind!r} tools are not supported")
        if not isinstance(tool.get("name"), str):
            raise invalid(f"tools[{index}]: needs a 'name'")
        specs.append(
            ToolSpec(
                tool["name"],
                str(tool.get("description") or ""),
                tool.get("parameters") or {"type": "object", "properties": {}},
            )
        )
    return tuple(specs)


def _format_of(text: Any) -> ResponseFormat | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "json_schema" and isinstance(fmt.get("name"), str):
        schema = fmt.get("schema")
        strict = fmt.get("strict")
        return ResponseFormat(
            "json_schema",
            fmt["name"],
            schema if isinstance(schema, dict) else None,
            strict if isinstance(strict, bool) else None,
        )
    raise UnsupportedParameter("text", "'text.format' must be text, json_object or json_schema")


def _number(data: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise UnsupportedParameter(key, f"'{key}' must be a number between {low:g} and {high:g}")
    return float(value)


def build_response_call(
    data: dict[str, Any], services: Services, fault_header: str | None
) -> ModelCall:
    settings = services.flags.current
    try:
        for name, value in data.items():
            if name in _HANDLED or name in _PASSTHROUGH:
                continue
            if name in _NEUTRAL and value in (_NEUTRAL[name], None):
                continue
            if name in _REFUSED:
                if value is None:
                    continue
                raise UnsupportedParameter(name, f"'{name}': {_REFUSED[name]}")
            raise UnsupportedParameter(name, f"Unrecognized request argument supplied: {name}")
        # The codec's integer rule, as for max_tokens: 1.5 refused, 1.0 is JSON's integer 1.
        limit = _integer(data, "max_output_tokens", 1, 1_000_000)
        choice = data.get("tool_choice")
        if isinstance(choice, dict) and choice.get("type") == "function":
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        parallel = data.get("parallel_tool_calls")
        user = data.get("user")
        options = GenerationOptions(
            top_p=_number(data, "top_p", 0, 1),
            user=user if isinstance(user, str) else None,
            parallel_tool_calls=parallel if isinstance(parallel, bool) else None,
            tool_choice=tool_choice_of(choice),
            response_format=_format_of(data.get("text")),
            passthrough=tuple(
                (name, data[name]) for name in sorted(_PASSTHROUGH) if data.get(name) is not None
            ),
        )
        tools = parse_tools(data.get("tools"))
        chain = parse_chain(data, services)
        check_options(options, chain, services)
        temperature = _number(data, "temperature", 0, 2)
    except WireFormatError as exc:
        raise invalid(str(exc)) from None
    instructions = data.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("'instructions' must be a string")
    system, messages = parse_input(data.get("input"), settings.max_message_chars)
    if instructions:
        system.insert(0, instructions)
    try:
        fault = parse_fault_plan(messages[-1].plain_text, fault_header, settings)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    return ModelCall(
        messages=messages,
        chain=chain,
        deadline=services.pipeline.new_deadline(),
        system="\n\n".join(system) or None,
        tools=tools,
        fault=fault,
        max_tokens=limit,
        temperature=temperature,
        options=options,
    )


# --------------------------------------------------------------------------- response


def usage_json(usage: Usage) -> dict[str, Any]:
    body: dict[str, Any] = {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }
    if usage.estimated:
        body["estimated"] = True  # our extension, as on /v1/chat/completions
    return body


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}] if text else []
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": content,
    }


def call_item(block: ToolUseBlock, item_id: str, status: str = "completed") -> dict[str, Any]:
    arguments = orjson.dumps(block.input).decode() if status == "completed" else ""
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": block.id,
        "name": block.name,
        "arguments": arguments,
        "status": status,
    }


class ResponseShell:
    """The response object of one request, from `in_progress` to its end."""

    def __init__(self, data: dict[str, Any], call: ModelCall) -> None:
        self.id = _new_id("resp")
        self.created_at = int(time.time())
        self.data = data
        self.call = call

    def body(
        self,
        model: str,
        status: str,
        output: list[dict[str, Any]],
        usage: Usage | None = None,
        stop_reason: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        data = self.data
        incomplete = None
        if stop_reason == "max_tokens":
            status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": data.get("instructions"),
            "max_output_tokens": self.call.max_tokens,
            "model": model,
            "output": output,
            "parallel_tool_calls": data.get("parallel_tool_calls", True),
            "temperature": self.call.temperature,
            "tool_choice": data.get("tool_choice", "auto"),
            "tools": data.get("tools") or [],
            "top_p": data.get("top_p"),
            "text": data.get("text") or {"format": {"type": "text"}},
            "metadata": data.get("metadata") or {},
            "store": False,
            "usage": usage_json(usage) if usage is not None else None,
        }

    def complete_body(self, response: ChatResponse, model: str) -> dict[str, Any]:
        output: list[dict[str, Any]] = []
        if response.text:
            output.append(message_item(_new_id("msg"), response.text))
        output.extend(call_item(block, _new_id("fc")) for block in response.tool_uses)
        return self.body(model, "completed", output, response.usage, response.stop_reason)


async def create_response(request: Request) -> Response:
    return await serve_admitted(request, _answer_response)


async def _answer_response(request: Request, data: dict[str, Any], services: Services) -> Answer:
    call = build_response_call(data, services, request.headers.get("x-fault"))
    stream = stream_flag(data)
    shell = ResponseShell(data, call)
    if stream:
        return response_events(services, call, shell)
    result = await services.pipeline.complete(call)
    body = shell.complete_body(result.response, result.model.id)
    return Response(orjson.dumps(body), media_type="application/json")


# --------------------------------------------------------------------------- streaming


class _EventWriter:
    """Responses API server-sent events, numbered in order."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"


async def response_events(
    services: Services, call: ModelCall, shell: ResponseShell
) -> AsyncGenerator[bytes, None]:
    """`response.created`, `response.in_progress`, the output items with their deltas, then
    `response.completed` — or, after the commit point, `error` and `response.failed`. Before
    the first item a failure propagates (an ordinary HTTP error, see `CompletionStream`)."""
    # An async generator (closed below so the upstream call is cancelled with the client).
    items = services.pipeline.stream(call)
    emit = _EventWriter()
    try:
        start = await anext(items)
        assert isinstance(start, StreamStart), "a committed stream starts with StreamStart"
        model = start.model.id
        output: list[dict[str, Any]] = []
        head = emit("response.created", response=shell.body(model, "in_progress", []))
        head += emit("response.in_progress", response=shell.body(model, "in_progress", []))
        text_id: str | None = None
        texts: list[str] = []
        usage = Usage()
        stop_reason = "end_turn"

        def close_text() -> bytes:
            nonlocal text_id
            if text_id is None:
                return b""
            index = len(output)
            text = "".join(texts)
            part = {"type": "output_text", "text": text, "annotations": []}
            frames = emit(
                "response.output_text.done",
                item_id=text_id,
                output_index=index,
                content_index=0,
                text=text,
                logprobs=[],
            )
            frames += emit(
                "response.content_part.done",
                item_id=text_id,
                output_index=index,
                content_index=0,
                part=part,
            )
            item = message_item(text_id, text)
            frames += emit("response.output_item.done", output_index=index, item=item)
            output.append(item)
            text_id = None
            return frames

        try:
            async for event in items:
                frames = head
                head = b""
                if isinstance(event, TextDelta):
                    index = len(output)
                    if text_id is None:
                        text_id = _new_id("msg")
                        texts = []
                        frames += emit(
                            "response.output_item.added",
                            output_index=index,
                            item=message_item(text_id, "", "in_progress"),
                        )
                        frames += emit(
                            "response.content_part.added",
                            item_id=text_id,
                            output_index=index,
                            content_index=0,
                            part={"type": "output_text", "text": "", "annotations": []},
                        )
                    texts.append(event.text)
                    frames += emit(
                        "response.output_text.delta",
                        item_id=text_id,
                        output_index=index,
                        content_index=0,
                        delta=event.text,
                        logprobs=[],
                    )
                elif isinstance(event, ToolUseEvent):
                    frames += close_text()
                    index = len(output)
                    item_id = _new_id("fc")
                    block = event.tool_use
                    arguments = orjson.dumps(block.input).decode()
                    frames += emit(
                        "response.output_item.added",
                        output_index=index,
                        item=call_item(block, item_id, "in_progress"),
                    )
                    frames += emit(
                        "response.function_call_arguments.delta",
                        item_id=item_id,
                        output_index=index,
                        delta=arguments,
                    )
                    frames += emit(
                        "response.function_call_arguments.done",
                        item_id=item_id,
                        output_index=index,
                        name=block.name,
                        arguments=arguments,
                    )
                    item = call_item(block, item_id)
                    frames += emit("response.output_item.done", output_index=index, item=item)
                    output.append(item)
                elif isinstance(event, UsageEvent):
                    usage += event.usage
                elif isinstance(event, StopEvent):
                    stop_reason = event.stop_reason
                if frames:
                    yield frames
        except Exception as exc:
            error = _api_error(exc)
            failure = {"code": error.openai_code or error.code, "message": error.message}
            frames = head + emit("error", param=None, **failure)
            failed = shell.body(model, "failed", output, usage, error=failure)
            yield frames + emit("response.failed", response=failed)
            return
        frames = head + close_text()
        done = shell.body(model, "completed", output, usage, stop_reason)
        kind = "response.incomplete" if done["status"] == "incomplete" else "response.completed"
        yield frames + emit(kind, response=done)
    finally:
        await items.aclose()
