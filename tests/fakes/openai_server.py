"""A fake OpenAI-compatible server: `POST /v1/chat/completions`, JSON and SSE with `[DONE]`.

The happy path is lean because benchmarks hammer it: the default behaviour's bodies are rendered
once per (model, stream, include_usage) and served from a cache.

Run as a process: `python -m tests.fakes.openai_server --port 9000 [--delay-ms 50]`.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import orjson
from aiohttp import web

from tests.fakes import Behaviour, FakeUpstream, StreamPlan, main
from tests.fakes.honour import honour_openai

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
_FINISH = {"end_turn": "stop", "tool_use": "tool_calls", "max_tokens": "length"}
_JSON_HEADERS = {"Content-Type": "application/json"}
_DONE = b"data: [DONE]\n\n"


def _sse(body: Any) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


class FakeOpenAI(FakeUpstream):
    name: ClassVar[str] = "openai"
    stream_content_type: ClassVar[str] = "text/event-stream"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.interrupted = 0  # streams ended by another request (`interruptible`)
        self._cache: dict[tuple[str, bool, bool], tuple[Behaviour, Any]] = {}

    def add_routes(self, app: web.Application) -> None:
        answer = self.handler(self._completions)
        app.router.add_post("/v1/chat/completions", answer)
        app.router.add_post("/chat/completions", answer)

    async def _completions(
        self, request: web.Request, behaviour: Behaviour, payload: Any
    ) -> web.StreamResponse:
        if behaviour.status != 200:
            return await self._error(request, behaviour)
        misplaced = _misplaced_tool_message(payload)
        if misplaced is not None:
            return await self._error(request, _rejected_tool_message(misplaced))
        behaviour = honour_openai(behaviour, payload)
        model = payload.get("model", "fake-model")
        stream = bool(payload.get("stream"))
        if behaviour.empty_body:
            headers = {"Content-Type": "text/event-stream" if stream else "application/json"}
            return web.Response(status=200, headers=headers, body=b"")
        include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        rendered = self._render(behaviour, model, stream, include_usage)
        if stream and behaviour.interruptible:
            return await self._interruptible(request, behaviour, rendered)
        if stream:
            return await self.send_stream(request, behaviour, rendered)
        return await self.send_body(
            request, behaviour, status=200, headers=_JSON_HEADERS, body=rendered
        )

    def _render(self, behaviour: Behaviour, model: str, stream: bool, include_usage: bool) -> Any:
        if behaviour is not self.default:
            return self._build(behaviour, model, stream, include_usage)
        key = (model, stream, include_usage)
        cached = self._cache.get(key)
        if cached is None or cached[0] is not behaviour:  # `default` may have been replaced
            cached = (behaviour, self._build(behaviour, model, stream, include_usage))
            self._cache[key] = cached
        return cached[1]

    def _build(self, behaviour: Behaviour, model: str, stream: bool, include_usage: bool) -> Any:
        finish = _finish_reason(behaviour)
        if not stream:
            message: dict[str, Any] = {"role": "assistant", "content": behaviour.text or None}
            if behaviour.tool_calls:
                message["tool_calls"] = [
                    {
                        "id": behaviour.tool_call_id(index),
                        "type": "function",
                        "function": {
                            "name": call.name,
                            "arguments": orjson.dumps(dict(call.input)).decode(),
                        },
                    }
                    for index, call in enumerate(behaviour.tool_calls)
                ]
            body: dict[str, Any] = {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            }
            if behaviour.usage is not None:
                body["usage"] = _usage(behaviour.usage)
            return orjson.dumps(body)
        return self._plan(behaviour, model, finish, include_usage)

    def _plan(
        self, behaviour: Behaviour, model: str, finish: str, include_usage: bool
    ) -> StreamPlan:
        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return _sse({**base, "choices": [choice]})

        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0}
        base["model"] = model
        items = [chunk({"role": "assistant", "content": ""})]
        is_chunk = [False]
        for piece in behaviour.text_chunks():
            items.append(chunk({"content": piece}))
            is_chunk.append(True)
        for index, call in enumerate(behaviour.tool_calls):
            head = {
                "index": index,
                "id": behaviour.tool_call_id(index),
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            items.append(chunk({"tool_calls": [head]}))
            is_chunk.append(False)
            arguments = orjson.dumps(dict(call.input)).decode()
            step = max(1, -(-len(arguments) // 3))
            for start in range(0, len(arguments), step):
                fragment = {
                    "index": index,
                    "function": {"arguments": arguments[start : start + step]},
                }
                items.append(chunk({"tool_calls": [fragment]}))
                is_chunk.append(True)
        terminator = len(items)
        if behaviour.done_without_finish:
            items.append(_DONE)
            return StreamPlan(items, [*is_chunk, False], terminator)
        items.append(chunk({}, finish))
        if include_usage and behaviour.usage is not None:
            items.append(_sse({**base, "choices": [], "usage": _usage(behaviour.usage)}))
        items.append(_DONE)
        is_chunk += [False] * (len(items) - terminator)
        return StreamPlan(items, is_chunk, terminator)

    async def _interruptible(
        self, request: web.Request, behaviour: Behaviour, plan: StreamPlan
    ) -> web.StreamResponse:
        """llama.cpp with `interrupt_requests`: a request arriving while this stream runs
        ends it with `[DONE]` and no finish_reason."""
        seen = self.request_count
        response = web.StreamResponse(headers={"Content-Type": self.stream_content_type})
        await response.prepare(request)
        for index, item in enumerate(plan.items):
            if index:
                await asyncio.sleep(behaviour.chunk_delay_s)
            if self.request_count != seen and index < plan.terminator:
                self.interrupted += 1
                await response.write(_DONE)
                break
            await response.write(item)
        await response.write_eof()
        return response

    async def _error(self, request: web.Request, behaviour: Behaviour) -> web.StreamResponse:
        headers = dict(_JSON_HEADERS)
        if behaviour.retry_after is not None:
            headers["Retry-After"] = str(behaviour.retry_after)
        body = orjson.dumps({"error": _error_body(behaviour)})
        if behaviour.error_body is not None:
            body = behaviour.error_body.encode()
        return await self.send_body(
            request, behaviour, status=behaviour.status, headers=headers, body=body
        )

    def prefill_of(self, payload: Any) -> str | None:
        messages = payload.get("messages") if isinstance(payload, dict) else None
        if not messages or messages[-1].get("role") != "assistant":
            return None
        content = messages[-1].get("content")
        return content if isinstance(content, str) else None

    def malformed_item(self) -> bytes:
        return b'data: {"id": "chatcmpl-fake", "choices": [{"delta": \n\n'

    def stream_error_item(self, behaviour: Behaviour) -> bytes:
        return _sse({"error": _error_body(behaviour)})


def _error_body(behaviour: Behaviour) -> dict[str, Any]:
    error_type = _ERROR_TYPES.get(behaviour.status, "server_error")
    return {
        "message": behaviour.message or f"fake {behaviour.error_type or error_type}",
        "type": error_type,
        "param": None,
        "code": behaviour.error_type,
    }


def _misplaced_tool_message(payload: Any) -> int | None:
    """The index of the first `tool` message that does not answer a tool call of the assistant
    message before it (only other tool messages in between), as real OpenAI checks."""
    messages = payload.get("messages") if isinstance(payload, dict) else None
    pending: set[str] = set()
    for index, message in enumerate(messages if isinstance(messages, list) else ()):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "tool":
            if message.get("tool_call_id") not in pending:
                return index
        else:
            calls = message.get("tool_calls") if role == "assistant" else None
            pending = {call.get("id") for call in calls or ()}
    return None


def _rejected_tool_message(index: int) -> Behaviour:
    """Real OpenAI's 400 for a tool message without its tool call (text verbatim)."""
    return Behaviour(
        status=400,
        message=(
            "Invalid parameter: messages with role 'tool' must be a response to a preceeding "
            f"message with 'tool_calls'. (messages.[{index}].role)"
        ),
    )


def _finish_reason(behaviour: Behaviour) -> str:
    if behaviour.stop_reason:
        return _FINISH.get(behaviour.stop_reason, behaviour.stop_reason)
    return "tool_calls" if behaviour.tool_calls else "stop"


def _usage(usage: tuple[int, int]) -> dict[str, int]:
    return {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}


if __name__ == "__main__":
    main(FakeOpenAI)
