"""The fakes honour the generation parameters a real model honours, so a dropped parameter
shows in the answer: a forced tool choice yields a call of that tool, `stop` cuts the text,
a JSON response format yields JSON (an instance of the schema when one is given).

An explicitly scripted answer wins: a behaviour that already has tool calls keeps them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson

from tests.fakes import Behaviour, ToolCall

# A forced choice: a tool name, "required" (any tool: the first), or "none".
Choice = str | None


def example_of(schema: Any, key: str = "value", defs: dict[str, Any] | None = None) -> Any:
    """A deterministic instance of a JSON schema (the subset tool and output schemas use)."""
    if not isinstance(schema, dict):
        return f"{key} (fake)"
    defs = defs if defs is not None else schema.get("$defs") or schema.get("definitions") or {}
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return example_of(defs.get(ref.rsplit("/", 1)[-1], {}), key, defs)
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for union in ("anyOf", "oneOf", "allOf"):
        options = [s for s in schema.get(union) or () if s.get("type") != "null"]
        if options:
            return example_of(options[0], key, defs)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        return {name: example_of(sub, name, defs) for name, sub in properties.items()}
    if kind == "array":
        return [example_of(schema.get("items") or {}, key, defs)]
    if kind == "integer":
        return 42
    if kind == "number":
        return 4.2
    if kind == "boolean":
        return True
    return f"{key} (fake)"


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cuts = [text.find(stop) for stop in stops if stop and stop in text]
    return text[: min(cuts)] if cuts else text


def honour(
    behaviour: Behaviour,
    *,
    tools: dict[str, Any],
    choice: Choice,
    stops: list[str],
    json_schema: Any = None,
    json_object: bool = False,
) -> Behaviour:
    """`behaviour` adjusted to the request's parameters (see the module docstring)."""
    if behaviour.status != 200:
        return behaviour
    changes: dict[str, Any] = {}
    if choice == "none":
        changes["tool_calls"] = ()
    elif choice is not None and not behaviour.tool_calls and tools:
        name = next(iter(tools)) if choice == "required" else choice
        if name in tools:
            changes["tool_calls"] = (ToolCall(name, example_of(tools[name], name)),)
            changes["text"] = ""
    if "tool_calls" not in changes or not changes["tool_calls"]:
        text = behaviour.text
        if json_schema is not None:
            text = orjson.dumps(example_of(json_schema)).decode()
        elif json_object:
            text = orjson.dumps({"answer": text}).decode()
        if stops:
            text = _cut_at_stop(text, stops)
        if text != behaviour.text:
            changes["text"] = text
    return replace(behaviour, **changes) if changes else behaviour


def honour_openai(behaviour: Behaviour, payload: Any) -> Behaviour:
    """A chat/completions request body's parameters."""
    if not isinstance(payload, dict):
        return behaviour
    tools = {
        tool["function"]["name"]: tool["function"].get("parameters") or {}
        for tool in payload.get("tools") or ()
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict)
    }
    raw_choice = payload.get("tool_choice")
    choice: Choice = None
    if isinstance(raw_choice, dict):
        choice = (raw_choice.get("function") or {}).get("name")
    elif raw_choice in ("required", "none"):
        choice = raw_choice
    stop = payload.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    fmt = payload.get("response_format") or {}
    schema = (
        (fmt.get("json_schema") or {}).get("schema") if fmt.get("type") == "json_schema" else None
    )
    return honour(
        behaviour,
        tools=tools,
        choice=choice,
        stops=stops,
        json_schema=schema,
        json_object=fmt.get("type") == "json_object",
    )


def honour_bedrock(behaviour: Behaviour, payload: Any) -> Behaviour:
    """A Converse request body's parameters (`toolConfig.toolChoice`, `stopSequences`)."""
    if not isinstance(payload, dict):
        return behaviour
    config = payload.get("toolConfig") or {}
    tools = {
        tool["toolSpec"]["name"]: tool["toolSpec"].get("inputSchema", {}).get("json") or {}
        for tool in config.get("tools") or ()
        if isinstance(tool, dict) and "toolSpec" in tool
    }
    raw_choice = config.get("toolChoice") or {}
    choice: Choice = None
    if "tool" in raw_choice:
        choice = raw_choice["tool"].get("name")
    elif "any" in raw_choice:
        choice = "required"
    stops = list((payload.get("inferenceConfig") or {}).get("stopSequences") or ())
    return honour(behaviour, tools=tools, choice=choice, stops=stops)
