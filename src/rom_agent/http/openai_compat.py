"""OpenAI-compatible facade: `POST /v1/chat/completions` and `GET /v1/models`.

A gateway route: the client's messages and tools go to the model through the same admission,
fallback, retry and breaker as `/api/chat`, and tool calls come back to the client, which runs
them (OpenAI semantics). Nothing is stored: OpenAI clients send the whole history each time.
Errors use OpenAI's shape so the official SDKs raise their usual exceptions.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from rom_agent.domain.messages import (
    ChatResponse,
    Message,
    ModelRef,
    StopEvent,
    TextDelta,
    ToolSpec,
    ToolUseEvent,
    UsageEvent,
)
from rom_agent.domain.options import NO_OPTIONS, GenerationOptions
from rom_agent.http.admission import admit, unless_client_leaves
from rom_agent.http.errors import ApiError, invalid, openai_error_payload, to_api_error
from rom_agent.http.requests import check_api_key, parse_json_object, read_body
from rom_agent.http.services import Services, services_of
from rom_agent.http.streaming import PermitStream
from rom_agent.logs import get_logger
from rom_agent.providers.base import unsupported_options
from rom_agent.providers.openai_request import (
    UnsupportedParameter,
    max_tokens_of,
    options_of,
    temperature_of,
)
from rom_agent.providers.openai_stream import ChunkWriter, sse
from rom_agent.providers.openai_wire import (
    WireFormatError,
    completion_json,
    messages_of,
    tools_of,
)
from rom_agent.resilience.faults import parse_fault_plan
from rom_agent.resilience.pipeline import ModelCall, StreamStart

log = get_logger("rom_agent.http.openai_compat")


def completion_id() -> str:
    return "chatcmpl-" + os.urandom(12).hex()


# --------------------------------------------------------------------------- request mapping


def parse_messages(raw: Any, max_chars: int) -> tuple[str | None, list[Message]]:
    try:
        return messages_of(raw, max_chars)
    except WireFormatError as exc:
        raise invalid(str(exc)) from None


def parse_tools(raw: Any) -> tuple[ToolSpec, ...]:
    try:
        return tools_of(raw)
    except WireFormatError as exc:
        raise invalid(str(exc)) from None


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
        # OpenAI answers an unknown model with a 404 `model_not_found`.
        raise ApiError(
            404, "MODEL_NOT_FOUND", str(exc), openai_code="model_not_found", param="model"
        ) from None


def check_options(
    options: GenerationOptions, chain: tuple[ModelRef, ...], services: Services
) -> None:
    """Refuse, before any upstream call, an option a model of the chain cannot honour: a
    fallback must not silently answer without it."""
    if options is NO_OPTIONS:
        return
    for model in chain:
        provider = services.providers.get(model.provider)
        if provider is None:
            continue  # the pipeline reports an unconfigured provider
        names = unsupported_options(provider, options)
        if names:
            raise UnsupportedParameter(
                names[0],
                f"'{names[0]}' is not supported by model {model.id} ({model.provider}); "
                "leave it out or choose another model",
            )


def build_call(data: dict[str, Any], services: Services, fault_header: str | None) -> ModelCall:
    settings = services.flags.current
    try:
        options = options_of(data)
        max_tokens = max_tokens_of(data)
        temperature = temperature_of(data)
    except WireFormatError as exc:
        raise invalid(str(exc)) from None
    system, messages = parse_messages(data.get("messages"), settings.max_message_chars)
    tools = parse_tools(data.get("tools"))
    choice = options.tool_choice
    if choice is not None and choice.mode == "tool" and choice.name not in {t.name for t in tools}:
        raise invalid(f"'tool_choice' names {choice.name!r}, which is not in 'tools'")
    chain = parse_chain(data, services)
    try:
        check_options(options, chain, services)
    except WireFormatError as exc:
        raise invalid(str(exc)) from None
    last_text = messages[-1].plain_text
    try:
        fault = parse_fault_plan(last_text, fault_header, settings)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    return ModelCall(
        messages=messages,
        chain=chain,
        deadline=services.pipeline.new_deadline(),
        system=system,
        tools=tools,
        fault=fault,
        max_tokens=max_tokens,
        temperature=temperature,
        options=options,
    )


# --------------------------------------------------------------------------- responses


def completion_body(response: ChatResponse, model: str) -> dict[str, Any]:
    return completion_json(response, model, completion_id(), int(time.time()))


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


def _model_json(ref: ModelRef, created: int) -> dict[str, Any]:
    return {"id": ref.id, "object": "model", "created": created, "owned_by": ref.provider}


async def list_models(request: Request) -> Response:
    """The configured chain. Guarded by API_KEYS like every other /v1 route."""
    services = services_of(request)
    check_api_key(request, services)
    created = int(services.started_wall)
    data = [_model_json(ref, created) for ref in services.chain]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


async def get_model(request: Request) -> Response:
    """`GET /v1/models/{model_id}`: one model of the chain (id or `provider/id`), else 404."""
    services = services_of(request)
    check_api_key(request, services)
    name = request.path_params["model_id"]
    for ref in services.chain:
        if name in (ref.id, ref.qualified):
            body = _model_json(ref, int(services.started_wall))
            return Response(orjson.dumps(body), media_type="application/json")
    raise ApiError(
        404,
        "MODEL_NOT_FOUND",
        f"The model {name!r} does not exist",
        openai_code="model_not_found",
        param="model",
    )


# What a route answers with: a whole response, or the SSE frames of a stream (which holds the
# admission permit until it ends).
Answer = Response | AsyncGenerator[bytes, None]


async def serve_admitted(
    request: Request,
    answer: Callable[[Request, dict[str, Any], Services], Awaitable[Answer]],
) -> Response:
    """The frame both OpenAI routes share: API key, body, admission, then `answer` with the
    parsed body; any failure becomes an error in OpenAI's shape."""
    services = services_of(request)
    try:
        check_api_key(request, services)
        raw = await read_body(request, services.flags.current.max_body_bytes)
        permit = await admit(request, services.bottleneck)
    except Exception as exc:
        return _error_response(_api_error(exc))
    streaming = False
    try:
        result = await answer(request, parse_json_object(raw), services)
        if isinstance(result, Response):
            return result
        streaming = True
        return CompletionStream(result, permit)
    except Exception as exc:
        return _error_response(_api_error(exc))
    finally:
        if not streaming:
            permit.release()


def stream_flag(data: dict[str, Any]) -> bool:
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("'stream' must be a boolean")
    return stream


async def chat_completions(request: Request) -> Response:
    return await serve_admitted(request, _answer_completion)


async def _answer_completion(request: Request, data: dict[str, Any], services: Services) -> Answer:
    call = build_call(data, services, request.headers.get("x-fault"))
    if stream_flag(data):
        options = data.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return completion_chunks(services, call, include_usage)
    result = await unless_client_leaves(request, services.pipeline.complete(call))
    body = completion_body(result.response, result.model.id)
    return Response(orjson.dumps(body), media_type="application/json")


class CompletionStream(PermitStream):
    """The streamed completion, with its status line held back until the commit point.

    Nothing is sent before the pipeline has a first chunk, so a failure before it (chain
    exhausted, every breaker open, a rejected request) is still an ordinary HTTP error in
    OpenAI's shape — the SDKs raise their usual `APIStatusError` subclass from `create()` —
    instead of a 200 whose body is an error.
    """

    async def stream_response(self, send: Send, first: bytes | None = None) -> None:
        try:
            first = await anext(self.events) if first is None else first
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
    # An async generator (closed below so the upstream call is cancelled with the client).
    items = services.pipeline.stream(call)
    try:
        start = await anext(items)  # the commit point; pipeline errors propagate from here
        assert isinstance(start, StreamStart), "a committed stream starts with StreamStart"
        writer = ChunkWriter(completion_id(), int(time.time()), start.model.id)
        stop_reason = "end_turn"
        try:
            async for item in items:
                if isinstance(item, TextDelta):
                    yield writer.text(item.text)
                elif isinstance(item, ToolUseEvent):
                    yield writer.tool_use(item.tool_use)
                elif isinstance(item, UsageEvent):
                    writer.add_usage(item.usage)
                elif isinstance(item, StopEvent):
                    stop_reason = item.stop_reason
        except Exception as exc:
            yield writer.pending_head() + sse(openai_error_payload(_api_error(exc)))
            return
        yield writer.finish(stop_reason, include_usage)
    finally:
        await items.aclose()
