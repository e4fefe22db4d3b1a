"""Real local fake upstreams (aiohttp.web on 127.0.0.1) for provider tests and benchmarks.

Both fakes share the machinery here: a scriptable `Behaviour` per request, request recording,
`/_fake/*` control routes, and one streaming engine that knows how to cut, stall, corrupt or
truncate a response. The protocol modules (`bedrock_server`, `openai_server`) only render bytes.

A behaviour is chosen per request, first match wins:
1. the `X-Fake-Behaviour` request header (JSON object of `Behaviour` fields), so a fake run as
   a process can be driven remotely;
2. the next entry of the request's model's script queue (`fake.script([...], model="m")`);
3. the next entry of the script queue (`fake.script([...])` or `POST /_fake/script`);
4. the model's default (`fake.model_defaults["m"]`);
5. `fake.default`.

Prefill (a request whose last message is the assistant's, asking the model to continue it) is
answered per `Behaviour.prefill`: "continue" answers only the rest of the text after the prefill
(what Anthropic models on Bedrock do), "ignore" answers the whole text anew (what many
OpenAI-compatible servers silently do), "reject" answers 400. The default is the protocol's own
(`FakeUpstream.default_prefill`). `prefills_for(model)` proves which models were sent one.

The model is the request's `model` field (OpenAI) or the `{model_id}` of the path (Bedrock), so
two models of a chain can share one fake and still be scripted, and counted, separately.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import orjson
from aiohttp import web

from rom_agent.domain.errors import ProviderError
from rom_agent.domain.messages import StreamEvent

LOOPBACK = "127.0.0.1"
TEST_REGION = "us-east-1"
DUMMY_API_KEY = "dummy-key-for-tests"
BEHAVIOUR_HEADER = "X-Fake-Behaviour"
_STALL_S = 3600.0  # "forever": the handler is cancelled when the client goes away
_WORDS = re.compile(r"\s*\S+")


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call the fake model makes. An empty `id` gets a deterministic one."""

    name: str
    input: Mapping[str, Any] = field(default_factory=dict)
    id: str = ""


@dataclass(frozen=True, slots=True)
class Behaviour:
    """What the fake does with one request. Defaults: a fast, successful text answer.

    "Chunks" are content deltas (text pieces and tool-input fragments); `*_after=N` acts once
    N of them have been sent (0 = before the first one; beyond the last = before the
    terminator).
    """

    status: int = 200  # != 200: an error response with `error_type` and `message`
    error_type: str | None = None  # Bedrock exception name / OpenAI error code
    message: str | None = None
    retry_after: float | str | None = None  # `Retry-After` header on error responses
    text: str = "Hello from the fake upstream."
    tool_calls: tuple[ToolCall, ...] = ()
    stop_reason: str | None = None  # default: derived from the answer
    usage: tuple[int, int] | None = (12, 7)  # (input, output); None omits it
    delay_s: float = 0.0  # before the response headers
    first_byte_delay_s: float = 0.0  # after the headers, before the first body byte
    chunk_delay_s: float = 0.0  # between streamed items
    cut_after: int | None = None  # close the connection abruptly
    stall_after: int | None = None  # stop sending, keep the connection open
    malformed_after: int | None = None  # send one corrupt item, then end the body
    stream_error_after: int | None = None  # send an in-stream error item, then end the body
    missing_terminator: bool = False  # end the body cleanly without the protocol terminator
    omit_done: bool = False  # end cleanly after the terminator, without the last item
    # (OpenAI: `[DONE]`, after `finish_reason` and usage; Bedrock: the `metadata` frame)
    prefill: str | None = None  # "continue" | "ignore" | "reject"; None: the fake's default
    # llama.cpp's quirks (OpenAI fake only): a 200 with an empty body (its answer to an
    # over-long streamed prompt); `[DONE]` without any finish_reason (how it ends a stream
    # it interrupted); `interruptible`: such an end as soon as another request arrives
    # (its default `interrupt_requests`), after the chunks already sent.
    empty_body: bool = False
    error_body: str | None = None  # a real upstream's error body, sent verbatim (OpenAI fake)
    done_without_finish: bool = False
    interruptible: bool = False
    reset: bool = False  # close the connection without any response

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Behaviour:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown behaviour fields: {sorted(unknown)}")
        values = dict(data)
        if "tool_calls" in values:
            values["tool_calls"] = tuple(ToolCall(**call) for call in values["tool_calls"])
        if values.get("usage") is not None:
            values["usage"] = tuple(values["usage"])
        return cls(**values)

    def text_chunks(self) -> list[str]:
        """The answer split into word-sized deltas, whitespace kept."""
        return _WORDS.findall(self.text)

    def tool_call_id(self, index: int) -> str:
        call = self.tool_calls[index]
        return call.id or f"call_{index:04d}"


@dataclass(slots=True)
class RecordedRequest:
    method: str
    path: str  # decoded
    raw_path: str  # as sent (percent-encoding kept), needed to verify SigV4
    headers: dict[str, str]
    body: bytes
    json: Any
    model: str | None = None  # the model the request named (see `FakeUpstream.model_of`)


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """A streamed answer as wire items. `items[terminator:]` is the protocol terminator."""

    items: Sequence[bytes]
    is_chunk: Sequence[bool]
    terminator: int


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Answer = Callable[[web.Request, Behaviour, Any], Awaitable[web.StreamResponse]]


class FakeUpstream:
    """Common server: behaviour selection, recording, control routes, stream engine."""

    name: ClassVar[str] = "fake"
    stream_content_type: ClassVar[str] = "application/octet-stream"
    default_prefill: ClassVar[str] = "ignore"

    def __init__(
        self, *, default: Behaviour | None = None, delay_s: float = 0.0, record: bool = True
    ) -> None:
        self.default = default or Behaviour()
        self.delay_s = delay_s  # fixed upstream latency added to every answer
        self.record = record
        self.requests: list[RecordedRequest] = []
        self.request_count = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.cancelled = 0  # handlers cancelled because the client went away
        self.model_defaults: dict[str, Behaviour] = {}
        self.port: int | None = None
        self._queue: deque[Behaviour] = deque()
        self._model_queues: dict[str, deque[Behaviour]] = {}
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ test API

    def script(
        self, behaviours: Behaviour | Iterable[Behaviour], *, model: str | None = None
    ) -> None:
        """Queue behaviours for the next requests, in order (after that: `default`). With
        `model`, only for the requests naming that model."""
        if isinstance(behaviours, Behaviour):
            behaviours = (behaviours,)
        if model is None:
            self._queue.extend(behaviours)
        else:
            self._model_queues.setdefault(model, deque()).extend(behaviours)

    def requests_for(self, model: str) -> list[RecordedRequest]:
        """The recorded requests that named `model`."""
        return [r for r in self.requests if r.model == model]

    def prefills_for(self, model: str) -> list[str | None]:
        """Per request that named `model`: the assistant prefill it carried, or None."""
        return [self.prefill_of(r.json) for r in self.requests_for(model)]

    def reset(self) -> None:
        """Forget recorded requests, counters and queued behaviours."""
        self.requests.clear()
        self._queue.clear()
        self._model_queues.clear()
        self.request_count = 0
        self.cancelled = 0
        self.max_in_flight = self.in_flight

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("fake not started")
        return f"http://{LOOPBACK}:{self.port}"

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.request_count,
            "by_path": dict(Counter(r.path for r in self.requests)),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "queued_behaviours": len(self._queue),
        }

    # ------------------------------------------------------------------ lifecycle

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/_fake/stats", self._handle_stats)
        app.router.add_post("/_fake/script", self._handle_script)
        app.router.add_post("/_fake/reset", self._handle_reset)
        self.add_routes(app)
        return app

    async def start(self, port: int = 0) -> FakeUpstream:
        # handler_cancellation: a stalled handler ends when its client disconnects.
        self._runner = web.AppRunner(
            self.build_app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, port, backlog=4096)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ protocol hooks

    def add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def malformed_item(self) -> bytes:
        raise NotImplementedError

    def stream_error_item(self, behaviour: Behaviour) -> bytes:
        raise NotImplementedError

    def prefill_of(self, payload: Any) -> str | None:
        """The text of a trailing assistant message (a prefill), else None."""
        raise NotImplementedError

    def model_of(self, request: web.Request, payload: Any) -> str | None:
        """The model a request names: the path's `{model_id}`, else the body's `model`."""
        model = request.match_info.get("model_id")
        if model is None and isinstance(payload, dict):
            value = payload.get("model")
            model = value if isinstance(value, str) else None
        return model

    # ------------------------------------------------------------------ shared handling

    def handler(self, answer: Answer) -> Handler:
        """Wrap a protocol handler: record the request, pick its behaviour, track in-flight."""

        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            payload = orjson.loads(body) if body else None
            model = self.model_of(request, payload)
            self.request_count += 1
            if self.record:
                self.requests.append(
                    RecordedRequest(
                        request.method,
                        request.path,
                        request.raw_path,
                        dict(request.headers),
                        body,
                        payload,
                        model,
                    )
                )
            try:
                behaviour = self._pick(request, model)
            except (ValueError, TypeError) as exc:  # a bad X-Fake-Behaviour directive
                return web.json_response({"error": f"bad behaviour: {exc}"}, status=400)
            prefill = self.prefill_of(payload) if payload is not None else None
            if prefill is not None:
                behaviour = _with_prefill(behaviour, prefill, self.default_prefill)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                delay = self.delay_s + behaviour.delay_s
                if delay:
                    await asyncio.sleep(delay)
                return await answer(request, behaviour, payload)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            finally:
                self.in_flight -= 1

        return handle

    def _pick(self, request: web.Request, model: str | None = None) -> Behaviour:
        directive = request.headers.get(BEHAVIOUR_HEADER)
        if directive:
            return Behaviour.from_json(orjson.loads(directive))
        if model is not None:
            queue = self._model_queues.get(model)
            if queue:
                return queue.popleft()
        if self._queue:
            return self._queue.popleft()
        if model is not None and model in self.model_defaults:
            return self.model_defaults[model]
        return self.default

    async def send_body(
        self,
        request: web.Request,
        behaviour: Behaviour,
        *,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
    ) -> web.StreamResponse:
        """A complete (non-streamed) body, honouring the delay/cut/stall/corrupt directives."""
        if behaviour.reset:
            return _reset(request)
        special = (
            behaviour.first_byte_delay_s
            or behaviour.cut_after is not None
            or behaviour.stall_after is not None
            or behaviour.malformed_after is not None
        )
        if not special:
            return web.Response(status=status, headers=headers, body=body)
        if behaviour.malformed_after is not None:
            body = body[: len(body) // 2]
            return web.Response(status=status, headers=headers, body=body)
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        if behaviour.first_byte_delay_s:
            await asyncio.sleep(behaviour.first_byte_delay_s)
        if behaviour.cut_after is not None or behaviour.stall_after is not None:
            await response.write(body[: len(body) // 2])
            if behaviour.stall_after is not None:
                await asyncio.sleep(_STALL_S)
            request.transport.abort()  # type: ignore[union-attr]
            return response
        await response.write(body)
        await response.write_eof()
        return response

    async def send_stream(
        self, request: web.Request, behaviour: Behaviour, plan: StreamPlan
    ) -> web.StreamResponse:
        """Stream `plan`, applying the behaviour's timing and failure directives."""
        if behaviour.reset:
            return _reset(request)
        response = web.StreamResponse(headers={"Content-Type": self.stream_content_type})
        await response.prepare(request)
        if behaviour.first_byte_delay_s:
            await asyncio.sleep(behaviour.first_byte_delay_s)

        end = plan.terminator if behaviour.missing_terminator else len(plan.items)
        if behaviour.omit_done and not behaviour.missing_terminator:
            end -= 1
        actions = (
            behaviour.cut_after,
            behaviour.stall_after,
            behaviour.malformed_after,
            behaviour.stream_error_after,
        )
        pending = [a for a in actions if a is not None]
        if not pending and not behaviour.chunk_delay_s:
            # Lean happy path: one write.
            await response.write(b"".join(plan.items[:end]))
            await response.write_eof()
            return response

        trigger = min(pending) if pending else None
        sent = 0
        for index in range(end):
            if trigger is not None and (sent >= trigger or index == plan.terminator):
                return await self._act(request, response, behaviour)
            if behaviour.chunk_delay_s and index:
                await asyncio.sleep(behaviour.chunk_delay_s)
            await response.write(plan.items[index])
            sent += plan.is_chunk[index]
        if trigger is not None:
            return await self._act(request, response, behaviour)
        await response.write_eof()
        return response

    async def _act(
        self, request: web.Request, response: web.StreamResponse, behaviour: Behaviour
    ) -> web.StreamResponse:
        if behaviour.stall_after is not None:
            await asyncio.sleep(_STALL_S)
        elif behaviour.malformed_after is not None:
            await response.write(self.malformed_item())
            await response.write_eof()
            return response
        elif behaviour.stream_error_after is not None:
            await response.write(self.stream_error_item(behaviour))
            await response.write_eof()
            return response
        request.transport.abort()  # type: ignore[union-attr]  # cut
        return response

    # ------------------------------------------------------------------ control routes

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats(), dumps=_dumps)

    async def _handle_script(self, request: web.Request) -> web.Response:
        data = orjson.loads(await request.read())
        items = data if isinstance(data, list) else [data]
        self.script(Behaviour.from_json(item) for item in items)
        return web.json_response({"queued": len(self._queue)}, dumps=_dumps)

    async def _handle_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True}, dumps=_dumps)


def _with_prefill(behaviour: Behaviour, prefill: str, default: str) -> Behaviour:
    """What the fake answers to a prefilled request (see the module docstring)."""
    mode = behaviour.prefill or default
    if mode == "reject":
        return replace(
            behaviour,
            status=400,
            error_type=None,
            message="This model does not support assistant message prefill.",
        )
    if mode == "continue" and behaviour.status == 200:
        # Anthropic refuses prefills ending in whitespace, so callers strip it: continue from
        # the prefill as sent and let the answer re-supply any whitespace it drops.
        text = behaviour.text
        if text.startswith(prefill):
            return replace(behaviour, text=text[len(prefill) :])
    return behaviour


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _reset(request: web.Request) -> web.StreamResponse:
    """Close the connection without answering (the client sees a disconnect)."""
    request.transport.abort()  # type: ignore[union-attr]
    return web.StreamResponse()


def main(factory: type[FakeUpstream], argv: Sequence[str] | None = None) -> None:
    """`python -m tests.fakes.<server> --port N [--delay-ms M]`; always on 127.0.0.1."""
    parser = argparse.ArgumentParser(prog=f"tests.fakes.{factory.name}_server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="fixed upstream latency")
    parser.add_argument("--no-record", action="store_true", help="count requests only")
    args = parser.parse_args(argv)

    async def serve() -> None:
        fake = factory(delay_s=args.delay_ms / 1000, record=not args.no_record)
        await fake.start(args.port)
        print(f"fake {factory.name} upstream on {fake.url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await fake.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


# --------------------------------------------------------------------------- test helpers


async def collect(stream: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    return [event async for event in stream]


async def collect_until_error(
    stream: AsyncIterator[StreamEvent],
) -> tuple[list[StreamEvent], ProviderError]:
    """The events that arrived before the stream failed, and the failure."""
    events: list[StreamEvent] = []
    try:
        async for event in stream:
            events.append(event)
    except ProviderError as exc:
        return events, exc
    raise AssertionError(f"stream ended cleanly: {events!r}")


def text_of(events: list[Any]) -> str:
    return "".join(getattr(event, "text", "") for event in events)
