"""Generation options a caller may ask of a model, beyond messages, tools and max tokens.

Provider-neutral: each provider says which options it honours (`Provider.unsupported`) and
maps them onto its own API; an option no model of the chain can honour is refused before any
upstream call (a 400 naming the option and the model), never dropped on the way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """`auto`, `none`, `required`, or one named tool (`mode == "tool"`)."""

    mode: Literal["auto", "none", "required", "tool"]
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """Structured output: `json_object`, or `json_schema` with its schema (OpenAI's shape)."""

    type: Literal["json_object", "json_schema"]
    name: str | None = None
    schema: Mapping[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    """`None`/empty means "not asked for": the provider's default applies."""

    stop: tuple[str, ...] = ()
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: Mapping[str, float] | None = None
    user: str | None = None
    parallel_tool_calls: bool | None = None
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None
    # OpenAI-only request fields forwarded verbatim to OpenAI-compatible upstreams
    # (reasoning_effort, service_tier, store, metadata, ...): name → value.
    passthrough: tuple[tuple[str, Any], ...] = ()

    def asked(self) -> list[str]:
        """Names (as on the wire) of the options this request sets."""
        names = [
            f.name
            for f in fields(self)
            if f.name != "passthrough" and getattr(self, f.name) not in (None, ())
        ]
        names.extend(name for name, _ in self.passthrough)
        return names


NO_OPTIONS = GenerationOptions()
