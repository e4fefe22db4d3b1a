"""OpenAI Chat Completions requests: the body we send upstream (client side) and the
request parameters we accept from clients (server side), with their encoding back onto the wire."""

from __future__ import annotations

from typing import Any

from rom_agent.domain.messages import ChatRequest
from rom_agent.domain.options import GenerationOptions, ResponseFormat, ToolChoice
from rom_agent.providers.openai_wire import WireFormatError, messages_json, tools_json


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
