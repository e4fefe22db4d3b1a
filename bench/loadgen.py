"""Open-loop load generator: a fixed arrival rate, latency per status, no coordinated omission.

Request *i* is due at `start + i / rate`, whatever happened to the earlier ones, so a slow target
cannot hide its queueing by slowing the generator down (no coordinated omission). It is sent on an
idle keep-alive connection, or a new one (up to `max_connections`; beyond that it waits for one,
and that wait counts in its latency). Latency runs from the moment the generator dispatches the
request; how late the generator itself dispatched (timer granularity, its own CPU) is reported
apart as `max_lateness_ms`.
Raw asyncio + httptools on uvloop: it sustains several thousand requests per second on one core
(the harness shows it against the direct upstream, the fastest target).

Loopback targets only; every run is bounded by its request count and a hard deadline.

    .venv/bin/python bench/loadgen.py --port 18100 --rate 200 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import cast

import httptools
import orjson
import uvloop

DEFAULT_BODY = orjson.dumps(
    {
        "model": "bench-model",
        "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
        "max_tokens": 32,
    }
)


@dataclass(slots=True)
class RunResult:
    rate: float
    duration_s: float
    sent: int = 0
    latencies: dict[int, list[float]] = field(default_factory=dict)  # status (0 = error) -> s
    elapsed_s: float = 0.0
    max_lateness_s: float = 0.0  # how late the generator itself sent a request

    @property
    def completed(self) -> int:
        return sum(len(v) for k, v in self.latencies.items() if k)

    def ok(self) -> list[float]:
        return self.latencies.get(200, [])

    def summary(self) -> dict[str, object]:
        statuses = {str(k): len(v) for k, v in sorted(self.latencies.items())}
        out: dict[str, object] = {
            "offered_rps": self.rate,
            "sent": self.sent,
            "elapsed_s": round(self.elapsed_s, 3),
            "achieved_rps": round(self.completed / self.elapsed_s, 1) if self.elapsed_s else 0,
            "statuses": statuses,
            "max_lateness_ms": round(self.max_lateness_s * 1000, 3),
        }
        for status, values in sorted(self.latencies.items()):
            out[f"latency_ms_{status}"] = percentiles(values)
        return out


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] * 1000, 3)

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": pick(1.0)}


class Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[int] | None = None
        self.reusable = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.reusable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(exc)

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.parser.get_status_code())

    def request(self, payload: bytes) -> asyncio.Future[int]:
        if self.transport is None:
            raise ConnectionError("connection closed")
        self.reusable = False
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Pool:
    def __init__(self, host: str, port: int, max_connections: int) -> None:
        self.host, self.port, self.max = host, port, max_connections
        self.idle: list[Connection] = []
        self.open = 0
        self.waiters: deque[asyncio.Future[Connection | None]] = deque()

    async def acquire(self) -> Connection:
        while True:
            while self.idle:
                conn = self.idle.pop()
                if conn.transport is not None and not conn.transport.is_closing():
                    return conn
                self.open -= 1  # the server closed it while it was idle
            if self.open < self.max:
                self.open += 1
                try:
                    _, conn = await asyncio.get_running_loop().create_connection(
                        Connection, self.host, self.port
                    )
                except BaseException:
                    self.open -= 1
                    raise
                return conn
            waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            conn = await waiter
            if conn is not None:
                return conn

    def release(self, conn: Connection) -> None:
        if conn.reusable and conn.transport is not None:
            while self.waiters:
                waiter = self.waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)
                    return
            self.idle.append(conn)
            return
        conn.close()
        self.open -= 1
        while self.waiters:  # a slot opened: wake one waiter to connect anew
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


def build_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def check_loopback(host: str) -> None:
    if host == "localhost":
        return
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"refusing to load {host}: only loopback targets are allowed")


async def run(
    host: str,
    port: int,
    path: str,
    rate: float,
    duration_s: float,
    *,
    body: bytes = DEFAULT_BODY,
    headers: dict[str, str] | None = None,
    max_connections: int = 512,
    timeout_s: float = 10.0,
) -> RunResult:
    """Offer `rate` requests/s for `duration_s` seconds; wait for the stragglers (bounded)."""
    check_loopback(host)
    loop = asyncio.get_running_loop()
    payload = build_request(host, port, path, body, headers or {})
    pool = Pool(host, port, max_connections)
    result = RunResult(rate=rate, duration_s=duration_s)
    total = max(1, int(rate * duration_s))
    interval = 1.0 / rate
    tasks: set[asyncio.Task[None]] = set()

    async def one() -> None:
        began = clock()
        status = 0
        try:
            async with asyncio.timeout(timeout_s):
                conn = await pool.acquire()
                try:
                    status = await conn.request(payload)
                finally:
                    pool.release(conn)
        except (OSError, TimeoutError, httptools.HttpParserError, ConnectionError):
            status = 0
        result.latencies.setdefault(status, []).append(clock() - began)

    clock = time.perf_counter  # uvloop's loop.time() only has millisecond resolution
    start = clock() + 0.01
    sent = 0
    while sent < total:
        now = clock()
        while sent < total and start + sent * interval <= now:
            due = start + sent * interval
            result.max_lateness_s = max(result.max_lateness_s, now - due)
            task = loop.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        if sent < total:
            await asyncio.sleep(max(0.0, start + sent * interval - clock()))
    result.sent = sent
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s + 1)
    for task in tasks:
        task.cancel()
    result.elapsed_s = clock() - start
    pool.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds (max 120)")
    parser.add_argument("--auth", default="", help="Authorization header value")
    parser.add_argument("--max-connections", type=int, default=512)
    args = parser.parse_args()
    duration = min(args.duration, 120.0)
    headers = {"Authorization": args.auth} if args.auth else {}
    began = time.perf_counter()
    result = uvloop.run(
        run(
            args.host,
            args.port,
            args.path,
            args.rate,
            duration,
            headers=headers,
            max_connections=args.max_connections,
        )
    )
    print(orjson.dumps(result.summary(), option=orjson.OPT_INDENT_2).decode())
    print(f"wall {time.perf_counter() - began:.2f}s")


if __name__ == "__main__":
    main()
