"""A lean fake OpenAI-compatible upstream for benchmarks: raw asyncio + httptools on uvloop.

It answers `POST /v1/chat/completions` (and `/chat/completions`) from precomputed bytes, as JSON
or, for `"stream": true`, as SSE with `--stream-chunks` content chunks and `data: [DONE]`. Nothing
is recorded and no framework runs per request, so it outruns every gateway it sits behind.

Control (used by the harness between measurements, loopback only):
    POST /_bench/delay?ms=20   every later answer waits 20 ms before its headers
    GET  /health               200

    .venv/bin/python bench/upstream.py --port 18100 [--delay-ms 0] [--stream-chunks 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from dataclasses import dataclass, field
from typing import Any, cast

import httptools
import orjson
import uvloop

ANSWER = "Hello! This is a short answer from the benchmark's fake upstream model."
USAGE = {"prompt_tokens": 14, "completion_tokens": 16, "total_tokens": 30}
JSON_TYPE = b"application/json"


@dataclass(slots=True)
class State:
    delay_s: float
    stream_chunks: int
    chunk_delay_s: float
    # (model, stream, include_usage) -> (head, body-or-chunks)
    cache: dict[tuple[str, bool, bool], tuple[bytes, list[bytes]]] = field(default_factory=dict)


def _head(status: int, content_type: bytes, length: int | None, keep_alive: bool) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"OK")
    lines = [b"HTTP/1.1 %d %s" % (status, reason), b"content-type: " + content_type]
    if length is None:
        lines.append(b"transfer-encoding: chunked")
        lines.append(b"cache-control: no-cache")
    else:
        lines.append(b"content-length: %d" % length)
    lines.append(b"connection: keep-alive" if keep_alive else b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def render(model: str, stream: bool, include_usage: bool, chunks: int) -> list[bytes]:
    """The body (one item) or the SSE events (one item each), already chunk-encoded."""
    if not stream:
        body = {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ANSWER},
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        }
        return [orjson.dumps(body)]
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_700_000_000}
    base["model"] = model

    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
        return b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"

    words = ANSWER.split(" ")  # one word per chunk, cycling through the answer
    pieces = [(" " if i else "") + words[i % len(words)] for i in range(max(1, chunks))]
    events = [event({"role": "assistant", "content": ""})]
    events += [event({"content": piece}) for piece in pieces]
    events.append(event({}, "stop"))
    if include_usage:
        usage = {**base, "choices": [], "usage": USAGE}
        events.append(b"data: " + orjson.dumps(usage) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return [_chunked(e) for e in events] + [b"0\r\n\r\n"]


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = ("_body", "_loop", "_parser", "_state", "_transport", "_url")

    def __init__(self, state: State) -> None:
        self._state = state
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._send([_head(400, JSON_TYPE, 2, False) + b"{}"], close=True)

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        url, body = self._url, b"".join(self._body)
        self._url, self._body = b"", []
        keep_alive = self._parser.should_keep_alive()
        method = self._parser.get_method()
        path, _, query = url.partition(b"?")
        state = self._state
        if method == b"POST" and path in (b"/v1/chat/completions", b"/chat/completions"):
            self._completion(body, keep_alive)
        elif path == b"/_bench/delay":
            state.delay_s = float(query.partition(b"ms=")[2] or 0) / 1000
            self._send([_head(200, JSON_TYPE, 2, keep_alive) + b"{}"], not keep_alive)
        elif path in (b"/health", b"/v1/models", b"/models"):
            payload = b'{"object":"list","data":[{"id":"bench-model","object":"model"}]}'
            head = _head(200, JSON_TYPE, len(payload), keep_alive)
            self._send([head + payload], not keep_alive)
        else:
            payload = b'{"error":{"message":"not found","type":"invalid_request_error"}}'
            self._send([_head(404, JSON_TYPE, len(payload), keep_alive) + payload], True)

    def _completion(self, body: bytes, keep_alive: bool) -> None:
        try:
            request = orjson.loads(body)
            model = str(request.get("model", "bench-model"))
            stream = request.get("stream") is True
            include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        except (orjson.JSONDecodeError, AttributeError):
            self._send([_head(400, JSON_TYPE, 2, False) + b"{}"], close=True)
            return
        state = self._state
        key = (model, stream, include_usage)
        cached = state.cache.get(key)
        if cached is None:
            parts = render(model, stream, include_usage, state.stream_chunks)
            if stream:
                cached = (_head(200, b"text/event-stream", None, True), parts)
            else:
                cached = (_head(200, JSON_TYPE, len(parts[0]), True), parts)
            state.cache[key] = cached
        head, parts = cached
        if not keep_alive:
            head = head.replace(b"connection: keep-alive", b"connection: close")
        if stream and state.chunk_delay_s > 0:
            items = [head + parts[0], *parts[1:]]
            self._later(state.delay_s, self._drip, items, 0, not keep_alive)
        else:
            self._later(state.delay_s, self._send, [head, *parts], not keep_alive)

    def _later(self, delay_s: float, callback: Any, *args: Any) -> None:
        if delay_s > 0:
            self._loop.call_later(delay_s, callback, *args)
        else:
            callback(*args)

    def _drip(self, items: list[bytes], index: int, close: bool) -> None:
        if self._transport is None:
            return
        self._transport.write(items[index])
        if index + 1 < len(items):
            self._loop.call_later(self._state.chunk_delay_s, self._drip, items, index + 1, close)
        elif close:
            self._transport.close()

    def _send(self, parts: list[bytes], close: bool) -> None:
        if self._transport is None:
            return
        self._transport.write(b"".join(parts))
        if close:
            self._transport.close()


async def serve(host: str, port: int, state: State) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(state), host, port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"upstream listening on http://{host}:{port} (pid {os.getpid()})", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18100)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="before the headers")
    parser.add_argument("--stream-chunks", type=int, default=20, help="content chunks per stream")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="between SSE events")
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the benchmark upstream only listens on loopback")
    state = State(args.delay_ms / 1000, args.stream_chunks, args.chunk_delay_ms / 1000)
    uvloop.run(serve(args.host, args.port, state))


if __name__ == "__main__":
    main()
