"""Bedrock Converse wire mapping: our ChatRequest → a Converse request body, a Converse response
body → ChatResponse, and the stop reasons that are a content-policy verdict. Pure functions, no
I/O; the provider that sends them and decodes ConverseStream is `rom_agent.providers.bedrock`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from rom_agent.domain.errors import CONTENT_FILTER, ErrorKind, ProviderError
from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    ContentBlock,
    Message,
    TextBlock,
    ToolUseBlock,
    Usage,
)
from rom_agent.domain.options import GenerationOptions


def encode_converse_request(request: ChatRequest) -> dict[str, Any]:
    """ChatRequest → Converse request body. Options map onto Converse's own fields (see
    `BedrockProvider.unsupported` for the ones that cannot)."""
    options = request.options
    choice = options.tool_choice
    # `tool_choice: none` is honoured by not offering the tools at all.
    tools = () if choice is not None and choice.mode == "none" else request.tools
    # Bedrock rejects toolUse/toolResult blocks when no toolConfig is sent (e.g. the agent
    # withdrew the tools to force a final answer): then they are rendered as text instead.
    as_text = not tools
    body: dict[str, Any] = {
        "messages": [_encode_message(message, as_text) for message in request.messages]
    }
    if request.system:
        body["system"] = [{"text": request.system}]
    inference: dict[str, Any] = {}
    if request.max_tokens is not None:
        inference["maxTokens"] = request.max_tokens
    if request.temperature is not None:
        inference["temperature"] = request.temperature
    if options.top_p is not None:
        inference["topP"] = options.top_p
    if options.stop:
        inference["stopSequences"] = list(options.stop)
    if inference:
        body["inferenceConfig"] = inference
    if options.user is not None:
        body["requestMetadata"] = {"user": options.user}
    if tools:
        body["toolConfig"] = {
            "tools": [
                {
                    "toolSpec": {
                        "name": tool.name,
                        "description": tool.description,
                        "inputSchema": {"json": tool.input_schema},
                    }
                }
                for tool in tools
            ]
        }
        if choice is not None and choice.mode != "none":
            body["toolConfig"]["toolChoice"] = _TOOL_CHOICES[choice.mode](choice.name)
    return body


_TOOL_CHOICES: dict[str, Callable[[str | None], dict[str, Any]]] = {
    "auto": lambda _: {"auto": {}},
    "required": lambda _: {"any": {}},
    "tool": lambda name: {"tool": {"name": name}},
}


def converse_unsupported_options(options: GenerationOptions) -> list[str]:
    """Options Converse has no equivalent for. `parallel_tool_calls: false` is honoured only
    with a named `tool_choice` (exactly that tool is called)."""
    names = [
        name
        for name in ("seed", "presence_penalty", "frequency_penalty", "logit_bias")
        if getattr(options, name) is not None
    ]
    if options.response_format is not None:
        names.append("response_format")
    if options.parallel_tool_calls is False and (
        options.tool_choice is None or options.tool_choice.mode != "tool"
    ):
        names.append("parallel_tool_calls")
    names.extend(name for name, _ in options.passthrough)
    return names


def _encode_message(message: Message, tools_as_text: bool) -> dict[str, Any]:
    blocks = message.content
    if len(blocks) > 1:  # Bedrock rejects blank text blocks next to tool blocks
        blocks = tuple(b for b in blocks if not (isinstance(b, TextBlock) and not b.text))
    return {
        "role": message.role,
        "content": [_encode_block(block, tools_as_text) for block in blocks],
    }


def _encode_block(block: ContentBlock, tools_as_text: bool) -> dict[str, Any]:
    if isinstance(block, TextBlock):
        return {"text": block.text}
    if isinstance(block, ToolUseBlock):
        if tools_as_text:
            return {"text": f"[tool call {block.name}: {orjson.dumps(block.input).decode()}]"}
        return {"toolUse": {"toolUseId": block.id, "name": block.name, "input": block.input}}
    if tools_as_text:
        label = "tool error" if block.is_error else "tool result"
        return {"text": f"[{label}: {block.content}]"}
    return {
        "toolResult": {
            "toolUseId": block.tool_use_id,
            "content": [{"text": block.content}],
            "status": "error" if block.is_error else "success",
        }
    }


# --------------------------------------------------------------------------- response mapping


def decode_converse_response(model: str, raw: bytes) -> ChatResponse:
    """Converse response body → ChatResponse."""
    try:
        data = orjson.loads(raw)
        blocks = (_decode_block(block) for block in data["output"]["message"]["content"])
        content = tuple(block for block in blocks if block is not None)
        stop_reason = data.get("stopReason") or "end_turn"
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise ProviderError(
            ErrorKind.TRANSIENT, "malformed Converse response", error_type="malformed_response"
        ) from exc
    check_converse_stop_reason(stop_reason)
    return ChatResponse(model, content, stop_reason, converse_usage(data.get("usage")))


def _decode_block(block: dict[str, Any]) -> ContentBlock | None:
    if "text" in block:
        return TextBlock(block["text"])
    if "toolUse" in block:
        tool = block["toolUse"]
        return ToolUseBlock(tool["toolUseId"], tool["name"], tool.get("input") or {})
    return None  # reasoningContent, images, …: nothing our callers consume


def converse_usage(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    return Usage(int(raw.get("inputTokens") or 0), int(raw.get("outputTokens") or 0))


# Stop reasons that are a content-policy verdict: a guardrail or the model's own filter
# (Anthropic models' `refusal`). The caller's answer, not an outage (see ErrorKind.POLICY).
_POLICY_STOPS = frozenset({"content_filtered", "guardrail_intervened", "refusal"})


def check_converse_stop_reason(stop_reason: str) -> None:
    if stop_reason in _POLICY_STOPS:
        raise ProviderError(
            ErrorKind.POLICY,
            f"the answer was stopped by the model's content policy ({stop_reason})",
            error_type=CONTENT_FILTER,
        )
