"""The one OpenAI Chat Completions wire codec, both directions.

The provider (`providers/openai.py`, client side) encodes our requests and decodes answers;
the facade (`http/openai_compat.py`, server side) decodes clients' requests and encodes our
answers. Both use the functions here, so the two sides cannot drift apart: one table of finish
reasons, one mapping of tool calls, one usage mapping.
Request bodies and parameters are in `openai_request`, streams in `openai_stream`.

The usage rule (written once, here): a `usage` object on the wire is the total of that
completion — OpenAI's `include_usage` chunk, or a running total on every chunk for servers
that send one (vLLM's continuous usage stats) — so the last one seen wins. Our `UsageEvent`
is what one upstream call billed, emitted once per call; whoever consumes our events (the
pipeline, the facade, a continued stream) *sums* them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    ContentBlock,
    Message,
    TextBlock,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    Usage,
)


class WireFormatError(ValueError):
    """A body that is not what the Chat Completions API allows (server side: a 400)."""


# --------------------------------------------------------------------------- finish reasons

# Wire → ours (the Converse vocabulary every caller sees).
_STOP_REASONS = {
    "stop": "end_turn",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "length": "max_tokens",
    "content_filter": "content_filtered",
}
# Ours (and Bedrock's) → wire.
_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "content_filtered": "content_filter",
    "guardrail_intervened": "content_filter",
}


def stop_reason_of(finish: str | None) -> str:
    """A wire `finish_reason` → our stop reason (unknown ones pass through)."""
    if not finish:
        return "end_turn"
    return _STOP_REASONS.get(finish, finish)


def finish_reason_of(stop_reason: str) -> str:
    """Our stop reason → a wire `finish_reason` (unknown ones become `stop`)."""
    if stop_reason in _STOP_REASONS:  # already a wire value
        return stop_reason
    return _FINISH_REASONS.get(stop_reason, "stop")


# --------------------------------------------------------------------------- usage


def usage_of(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    return Usage(int(raw.get("prompt_tokens") or 0), int(raw.get("completion_tokens") or 0))


def usage_json(usage: Usage) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.estimated:  # our documented extension: the upstream reported no usage
        body["estimated"] = True
    return body


# Characters per token of the estimate: OpenAI's rule of thumb for English text (~4); no
# tokenizer ships with the gateway, so none is "known" for any model.
CHARS_PER_TOKEN = 4


def _tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN) if chars > 0 else 0


def estimate_usage(request: ChatRequest, completion_chars: int) -> Usage:
    """Usage for an upstream that reported none (llama.cpp ignores `include_usage`): never
    zero for text that was sent or generated, and flagged `estimated`."""
    chars = len(request.system or "")
    for message in request.messages:
        for block in message.content:
            if isinstance(block, TextBlock):
                chars += len(block.text)
            elif isinstance(block, ToolResultBlock):
                chars += len(block.content)
            else:
                chars += len(block.name) + len(orjson.dumps(block.input))
    for tool in request.tools:
        chars += len(tool.name) + len(tool.description) + len(orjson.dumps(tool.input_schema))
    return Usage(_tokens(chars), _tokens(completion_chars), estimated=True)


def completion_chars(response: ChatResponse) -> int:
    chars = len(response.text)
    for block in response.tool_uses:
        chars += len(block.name) + len(orjson.dumps(block.input))
    return chars


# --------------------------------------------------------------------------- tool calls


def tool_call_json(block: ToolUseBlock, index: int | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {
        "id": block.id,
        "type": "function",
        "function": {"name": block.name, "arguments": orjson.dumps(block.input).decode()},
    }
    if index is not None:
        call["index"] = index
    return call


def arguments_of(raw: str | dict[str, Any] | None) -> dict[str, Any]:
    """`function.arguments` → an object. Raises WireFormatError if it is not JSON."""
    if isinstance(raw, dict):  # some servers (Ollama) send the object itself
        return raw
    if not raw:
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise WireFormatError("function.arguments must be a JSON string") from None
    return value if isinstance(value, dict) else {"value": value}


def tool_use_of(call: Any, where: str = "tool_calls") -> ToolUseBlock:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise WireFormatError(f"{where}: each tool call needs function.name")
    arguments = function.get("arguments")
    if arguments is not None and not isinstance(arguments, str | dict):
        raise WireFormatError(f"{where}: function.arguments must be a JSON string")
    return ToolUseBlock(str(call.get("id") or ""), function["name"], arguments_of(arguments))


def tools_json(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.input_schema,
            },
        }
        for tool in tools
    ]


def tools_of(raw: Any) -> tuple[ToolSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise WireFormatError("'tools' must be a list")
    specs = []
    for index, tool in enumerate(raw):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise WireFormatError(f"tools[{index}]: needs function.name")
        specs.append(
            ToolSpec(
                function["name"],
                str(function.get("description") or ""),
                function.get("parameters") or {"type": "object", "properties": {}},
            )
        )
    return tuple(specs)


# --------------------------------------------------------------------------- messages


def messages_json(system: str | None, messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Our messages → wire messages. Tool results become `tool` messages, which must directly
    follow the assistant turn that asked for them, so they go before any text of the same
    user message."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": system})
    for message in messages:
        if message.role == "assistant":
            out.append(_assistant_json(message.content))
            continue
        texts: list[str] = []
        for block in message.content:
            if isinstance(block, ToolResultBlock):
                out.append(
                    {"role": "tool", "tool_call_id": block.tool_use_id, "content": block.content}
                )
            elif isinstance(block, TextBlock):
                texts.append(block.text)
        if texts:
            out.append({"role": "user", "content": "".join(texts)})
    return out


def _assistant_json(content: Sequence[ContentBlock]) -> dict[str, Any]:
    text = "".join(block.text for block in content if isinstance(block, TextBlock))
    calls = [tool_call_json(block) for block in content if isinstance(block, ToolUseBlock)]
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": calls}


def content_text(content: Any, where: str) -> str:
    """Message content: a string, or a list of parts of which only text is supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                raise WireFormatError(f"{where}: only text content parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise WireFormatError(f"{where}: a text part needs a string 'text'")
            texts.append(text)
        return "".join(texts)
    raise WireFormatError(f"{where}: content must be a string or a list of parts")


def limited_text(item: dict[str, Any], where: str, max_chars: int) -> str:
    """A message's `content` as text, at most `max_chars` characters."""
    text = content_text(item.get("content"), where)
    if len(text) > max_chars:
        raise WireFormatError(f"{where}: content exceeds {max_chars} characters")
    return text


class TurnBuilder:
    """Wire messages (Chat Completions `messages`, Responses `input`) → our turns: system texts
    are kept apart, and consecutive tool results join one user turn before the next message."""

    __slots__ = ("_results", "messages", "system")

    def __init__(self) -> None:
        self.system: list[str] = []
        self.messages: list[Message] = []
        self._results: list[ContentBlock] = []

    def add_result(self, block: ToolResultBlock) -> None:
        self._results.append(block)

    def flush(self) -> None:
        """Close the pending tool results into their user turn."""
        if self._results:
            self.messages.append(Message("user", tuple(self._results)))
            self._results.clear()

    def add(self, message: Message) -> None:
        self.flush()
        self.messages.append(message)


def messages_of(raw: Any, max_chars: int) -> tuple[str | None, list[Message]]:
    """Wire messages → (system prompt, our messages); consecutive tool results join one user
    turn. Each message's text is at most `max_chars` characters."""
    if not isinstance(raw, list) or not raw:
        raise WireFormatError("'messages' must be a non-empty list")
    turns = TurnBuilder()
    for index, item in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise WireFormatError(f"{where} must be an object")
        role = item.get("role")
        if role in ("system", "developer"):
            turns.system.append(limited_text(item, where, max_chars))
        elif role == "tool":
            result = limited_text(item, where, max_chars)
            turns.add_result(ToolResultBlock(str(item.get("tool_call_id", "")), result))
        elif role == "user":
            turns.add(Message("user", (TextBlock(limited_text(item, where, max_chars)),)))
        elif role == "assistant":
            turns.flush()
            blocks: list[ContentBlock] = []
            text = limited_text(item, where, max_chars)
            if text:
                blocks.append(TextBlock(text))
            calls = item.get("tool_calls")
            if calls:
                if not isinstance(calls, list):
                    raise WireFormatError(f"{where}: tool_calls must be a list")
                blocks.extend(tool_use_of(call, where) for call in calls)
            turns.add(Message("assistant", tuple(blocks)))
        else:
            raise WireFormatError(f"{where}: unknown role {role!r}")
    turns.flush()
    if not turns.messages:
        raise WireFormatError("'messages' needs at least one user message")
    return ("\n\n".join(turns.system) or None), turns.messages


# --------------------------------------------------------------------------- bodies


def response_of(model: str, data: Any) -> tuple[ChatResponse, str | None]:
    """A chat/completions response body → (ChatResponse, the wire finish_reason).
    Raises KeyError/TypeError/… or WireFormatError when the body is not one."""
    choice = data["choices"][0]
    message = choice["message"]
    content: list[ContentBlock] = []
    if message.get("content"):
        content.append(TextBlock(message["content"]))
    content.extend(tool_use_of(call) for call in message.get("tool_calls") or ())
    finish = choice.get("finish_reason")
    response = ChatResponse(
        model, tuple(content), stop_reason_of(finish), usage_of(data.get("usage"))
    )
    return response, finish


def completion_json(
    response: ChatResponse, model: str, completion_id: str, created: int
) -> dict[str, Any]:
    """ChatResponse → a chat.completion body (server side)."""
    message: dict[str, Any] = {"role": "assistant", "content": response.text or None}
    tool_uses = response.tool_uses
    if tool_uses:
        message["tool_calls"] = [tool_call_json(block) for block in tool_uses]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason_of(response.stop_reason),
                "logprobs": None,
            }
        ],
        "usage": usage_json(response.usage),
    }
