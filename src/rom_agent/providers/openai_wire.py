"""The one OpenAI Chat Completions wire codec, both directions.

The provider (`providers/openai.py`, client side) encodes our requests and decodes answers;
the facade (`http/openai_compat.py`, server side) decodes clients' requests and encodes our
answers. Both use the functions here, so the two sides cannot drift apart: one table of finish
reasons, one mapping of tool calls, one usage mapping, one stream accumulator.

The usage rule (written once, here): a `usage` object on the wire is the total of that
completion — OpenAI's `include_usage` chunk, or a running total on every chunk for servers
that send one (vLLM's continuous usage stats) — so the last one seen wins. Our `UsageEvent`
is what one upstream call billed, emitted once per call; whoever consumes our events (the
pipeline, the facade, a continued stream) *sums* them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import orjson

from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    ContentBlock,
    Message,
    StreamEvent,
    TextBlock,
    TextDelta,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    ToolUseEvent,
    Usage,
)
from rom_agent.domain.options import GenerationOptions, ResponseFormat, ToolChoice

DONE = b"[DONE]"


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


def messages_of(raw: Any, max_chars: int) -> tuple[str | None, list[Message]]:
    """Wire messages → (system prompt, our messages); consecutive tool results join one user
    turn. Each message's text is at most `max_chars` characters."""
    if not isinstance(raw, list) or not raw:
        raise WireFormatError("'messages' must be a non-empty list")
    system: list[str] = []
    messages: list[Message] = []
    pending_results: list[ContentBlock] = []

    def flush_results() -> None:
        if pending_results:
            messages.append(Message("user", tuple(pending_results)))
            pending_results.clear()

    def text_of(item: dict[str, Any], where: str) -> str:
        text = content_text(item.get("content"), where)
        if len(text) > max_chars:
            raise WireFormatError(f"{where}: content exceeds {max_chars} characters")
        return text

    for index, item in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise WireFormatError(f"{where} must be an object")
        role = item.get("role")
        if role in ("system", "developer"):
            system.append(text_of(item, where))
        elif role == "tool":
            result = text_of(item, where)
            pending_results.append(ToolResultBlock(str(item.get("tool_call_id", "")), result))
        elif role == "user":
            flush_results()
            messages.append(Message("user", (TextBlock(text_of(item, where)),)))
        elif role == "assistant":
            flush_results()
            blocks: list[ContentBlock] = []
            text = text_of(item, where)
            if text:
                blocks.append(TextBlock(text))
            calls = item.get("tool_calls")
            if calls:
                if not isinstance(calls, list):
                    raise WireFormatError(f"{where}: tool_calls must be a list")
                blocks.extend(tool_use_of(call, where) for call in calls)
            messages.append(Message("assistant", tuple(blocks)))
        else:
            raise WireFormatError(f"{where}: unknown role {role!r}")
    flush_results()
    if not messages:
        raise WireFormatError("'messages' needs at least one user message")
    return ("\n\n".join(system) or None), messages


# --------------------------------------------------------------------------- bodies


def request_json(request: ChatRequest, *, stream: bool) -> dict[str, Any]:
    """ChatRequest → a chat/completions request body (client side)."""
    body: dict[str, Any] = {
        "model": request.model,
        "messages": messages_json(request.system, request.messages),
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.tools:
        body["tools"] = tools_json(request.tools)
    body.update(options_json(request.options))
    return body


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


# --------------------------------------------------------------------------- streams


class StreamAccumulator:
    """chat.completion.chunk objects → our stream events (client side).

    Text passes through as it comes; tool-call deltas are assembled by their `index` and
    emitted whole when the choice finishes. Usage follows the rule in the module docstring.
    """

    __slots__ = ("_tools", "done", "finish_reason", "saw_usage", "text_chars", "usage")
    # `text_chars`: characters generated (text and tool calls), for a usage estimate.

    def __init__(self) -> None:
        self._tools: dict[int, list[Any]] = {}  # index → [id, name, argument fragments]
        self.done = False  # `[DONE]` seen
        self.finish_reason: str | None = None  # the wire value, once a choice finished
        self.usage = Usage()
        self.saw_usage = False
        self.text_chars = 0

    @property
    def finished(self) -> bool:
        """A choice carried its finish_reason: the answer is whole."""
        return self.finish_reason is not None

    def handle(self, chunk: dict[str, Any]) -> list[StreamEvent]:
        if chunk.get("usage"):
            self.usage = usage_of(chunk["usage"])  # a total: the last one wins
            self.saw_usage = True
        events: list[StreamEvent] = []
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                self.text_chars += len(text)
                events.append(TextDelta(text))
            for call in delta.get("tool_calls") or ():
                self._tool_delta(call)
            finish = choice.get("finish_reason")
            if finish:
                self.finish_reason = finish
                for _, tool in sorted(self._tools.items()):
                    arguments = "".join(tool[2])
                    self.text_chars += len(tool[1]) + len(arguments)
                    block = ToolUseBlock(tool[0], tool[1], arguments_of(arguments))
                    events.append(ToolUseEvent(block))
                self._tools.clear()
        return events

    def handle_batch(self, batch: list[bytes], on_error: Any = None) -> Iterator[StreamEvent]:
        """The events of one network read, consecutive text deltas merged into one.

        When the upstream is ahead of us its chunks arrive together; forwarding them as one
        saves a pipeline step, an SSE frame and a socket write per chunk, as a byte-forwarding
        proxy would. A live model's tokens arrive spaced out and pass one by one. Whatever was
        decoded before a failure is yielded before the failure is raised. `on_error(chunk)`
        turns an in-stream `{"error": …}` object into the exception to raise.
        """
        texts: list[str] = []
        try:
            for data in batch:
                if data == DONE:
                    self.done = True
                    break
                chunk = orjson.loads(data)
                if "error" in chunk and on_error is not None:
                    raise on_error(chunk)
                for event in self.handle(chunk):
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
        index = call.get("index", 0)
        tool = self._tools.get(index)
        if tool is None:
            tool = self._tools[index] = ["", "", []]
        if call.get("id"):
            tool[0] = call["id"]
        function = call.get("function") or {}
        if function.get("name"):
            tool[1] = function["name"]
        if function.get("arguments"):
            tool[2].append(function["arguments"])


def sse(body: Any) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


class ChunkWriter:
    """Our stream events → chat.completion.chunk SSE frames (server side).

    The role chunk rides with the first content chunk (one write instead of two); tool calls
    get consecutive indexes; usage is summed over `UsageEvent`s (see the usage rule).
    """

    __slots__ = ("_head", "_tool_index", "completion_id", "created", "model", "usage")

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self.usage = Usage()
        self._tool_index = 0
        self._head = self.chunk({"role": "assistant", "content": ""})

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        body: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        return sse(body)

    def _with_head(self, frame: bytes) -> bytes:
        head, self._head = self._head, b""
        return head + frame

    def text(self, text: str) -> bytes:
        return self._with_head(self.chunk({"content": text}))

    def tool_use(self, block: ToolUseBlock) -> bytes:
        delta = {"tool_calls": [tool_call_json(block, self._tool_index)]}
        self._tool_index += 1
        return self._with_head(self.chunk(delta))

    def add_usage(self, usage: Usage) -> None:
        self.usage = self.usage + usage

    def pending_head(self) -> bytes:
        """The role chunk if nothing was written yet (an error must follow it)."""
        head, self._head = self._head, b""
        return head

    def finish(self, stop_reason: str, include_usage: bool) -> bytes:
        """The finish chunk, the usage chunk if asked for, and `[DONE]`."""
        frames = [self._with_head(self.chunk({}, finish_reason_of(stop_reason)))]
        if include_usage:
            body = {
                "id": self.completion_id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage_json(self.usage),
            }
            frames.append(sse(body))
        frames.append(b"data: [DONE]\n\n")
        return b"".join(frames)


# --------------------------------------------------------------------------- parameters

# Chat Completions request fields, by what the gateway does with them (docs/openai.md has the
# table). Handled by the gateway itself:
HANDLED_PARAMS = frozenset(
    {
        "model",
        "messages",
        "fallbacks",  # ours: the chain of this request
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "tools",
        "n",  # 1 only
    }
)
# Forwarded verbatim to OpenAI-compatible upstreams; refused for models that cannot take them.
PASSTHROUGH_PARAMS = frozenset(
    {
        "reasoning_effort",
        "service_tier",
        "store",
        "metadata",
        "prompt_cache_key",
        "prompt_cache_retention",
        "safety_identifier",
        "verbosity",
    }
)
# Asked for with a non-default value, nothing behind the gateway can honour these (their
# result has no place in our answer), so they are refused whatever the model.
NEVER_HONOURED = {
    "logprobs": "log probabilities are not returned by this gateway",
    "top_logprobs": "log probabilities are not returned by this gateway",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "functions": "the deprecated 'functions' is not supported; use 'tools'",
    "function_call": "the deprecated 'function_call' is not supported; use 'tool_choice'",
}
OPTION_PARAMS = frozenset(
    {
        "stop",
        "top_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "user",
        "parallel_tool_calls",
        "tool_choice",
        "response_format",
    }
)


class UnsupportedParameter(WireFormatError):
    """A parameter the gateway (or a model of the chain) cannot honour: a 400 naming it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _is_default(name: str, value: Any) -> bool:
    """A never-honoured parameter sent with its neutral value is no request at all."""
    if value is None or value is False:
        return True
    return name == "modalities" and value == ["text"]


def _number(data: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise UnsupportedParameter(key, f"'{key}' must be a number between {low:g} and {high:g}")
    return float(value)


def _integer(data: dict[str, Any], key: str, low: int, high: int) -> int | None:
    """Integers only: 1.5 is refused, never truncated (1.0 is accepted as 1)."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UnsupportedParameter(key, f"'{key}' must be an integer between {low} and {high}")
    return value


def max_tokens_of(data: dict[str, Any]) -> int | None:
    limit = _integer(data, "max_completion_tokens", 1, 1_000_000)
    return limit if limit is not None else _integer(data, "max_tokens", 1, 1_000_000)


def temperature_of(data: dict[str, Any]) -> float | None:
    return _number(data, "temperature", 0, 2)


def tool_choice_of(raw: Any) -> ToolChoice | None:
    if raw is None:
        return None
    if raw in ("auto", "none", "required"):
        return ToolChoice(raw)
    if isinstance(raw, dict) and raw.get("type") == "function":
        function = raw.get("function")
        name = function.get("name") if isinstance(function, dict) else raw.get("name")
        if isinstance(name, str) and name:
            return ToolChoice("tool", name)
    raise UnsupportedParameter(
        "tool_choice",
        "'tool_choice' must be 'auto', 'none', 'required' or "
        '{"type": "function", "function": {"name": ...}}',
    )


def response_format_of(raw: Any) -> ResponseFormat | None:
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise UnsupportedParameter(
                "response_format", "'response_format.json_schema' needs a 'name'"
            )
        schema = spec.get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise UnsupportedParameter(
                "response_format", "'response_format.json_schema.schema' must be an object"
            )
        strict = spec.get("strict")
        description = spec.get("description")
        return ResponseFormat(
            "json_schema",
            spec["name"],
            schema,
            strict if isinstance(strict, bool) else None,
            description if isinstance(description, str) else None,
        )
    raise UnsupportedParameter(
        "response_format", "'response_format.type' must be 'text', 'json_object' or 'json_schema'"
    )


def options_of(data: dict[str, Any]) -> GenerationOptions:
    """The generation options of a chat/completions request body (server side).

    Every field is accounted for: handled by the gateway, an option, forwarded, or refused
    with `UnsupportedParameter` — an unknown one as OpenAI itself refuses it.
    """
    for name, value in data.items():
        if name in HANDLED_PARAMS or name in OPTION_PARAMS or name in PASSTHROUGH_PARAMS:
            continue
        if name in NEVER_HONOURED:
            if _is_default(name, value):
                continue
            raise UnsupportedParameter(name, f"'{name}': {NEVER_HONOURED[name]}")
        raise UnsupportedParameter(name, f"Unrecognized request argument supplied: {name}")
    n = _integer(data, "n", 1, 128)
    if n is not None and n > 1:
        raise UnsupportedParameter("n", "'n' > 1 is not supported: one choice per request")
    stop = data.get("stop")
    if isinstance(stop, str):
        stops: tuple[str, ...] = (stop,)
    elif stop is None:
        stops = ()
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise UnsupportedParameter("stop", "'stop' must be a string or up to 4 strings")
    logit_bias = data.get("logit_bias")
    if logit_bias is not None and not (
        isinstance(logit_bias, dict)
        and all(
            isinstance(v, int | float) and not isinstance(v, bool) and -100 <= v <= 100
            for v in logit_bias.values()
        )
    ):
        raise UnsupportedParameter("logit_bias", "'logit_bias' maps token ids to -100..100")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise UnsupportedParameter("user", "'user' must be a string")
    parallel = data.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise UnsupportedParameter("parallel_tool_calls", "'parallel_tool_calls' must be a boolean")
    passthrough = tuple(
        (name, data[name]) for name in sorted(PASSTHROUGH_PARAMS) if data.get(name) is not None
    )
    return GenerationOptions(
        stop=stops,
        top_p=_number(data, "top_p", 0, 1),
        seed=_integer(data, "seed", -(2**63), 2**63 - 1),
        presence_penalty=_number(data, "presence_penalty", -2, 2),
        frequency_penalty=_number(data, "frequency_penalty", -2, 2),
        logit_bias=logit_bias,
        user=user,
        parallel_tool_calls=parallel,
        tool_choice=tool_choice_of(data.get("tool_choice")),
        response_format=response_format_of(data.get("response_format")),
        passthrough=passthrough,
    )


def tool_choice_json(choice: ToolChoice) -> Any:
    if choice.mode == "tool":
        return {"type": "function", "function": {"name": choice.name}}
    return choice.mode


def response_format_json(fmt: ResponseFormat) -> dict[str, Any]:
    if fmt.type == "json_object":
        return {"type": "json_object"}
    spec: dict[str, Any] = {"name": fmt.name}
    if fmt.schema is not None:
        spec["schema"] = fmt.schema
    if fmt.strict is not None:
        spec["strict"] = fmt.strict
    if fmt.description is not None:
        spec["description"] = fmt.description
    return {"type": "json_schema", "json_schema": spec}


def options_json(options: GenerationOptions) -> dict[str, Any]:
    """GenerationOptions → chat/completions request fields (client side)."""
    body: dict[str, Any] = dict(options.passthrough)
    if options.stop:
        body["stop"] = list(options.stop)
    for name in ("top_p", "seed", "presence_penalty", "frequency_penalty", "user"):
        value = getattr(options, name)
        if value is not None:
            body[name] = value
    if options.logit_bias is not None:
        body["logit_bias"] = dict(options.logit_bias)
    if options.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = options.parallel_tool_calls
    if options.tool_choice is not None:
        body["tool_choice"] = tool_choice_json(options.tool_choice)
    if options.response_format is not None:
        body["response_format"] = response_format_json(options.response_format)
    return body
