"""Soak run: is the memory of a long-running `rom-agent serve` flat?

Starts the real service as production runs it (`python -m rom_agent serve`: uvicorn on uvloop,
the default simulator chain, SQLite in a scratch directory) and sends it a mix of requests
from a few concurrent clients, reading the server's RSS (`VmRSS`) at the start and after every
`--every` requests:

* `/api/chat` on long conversations (`--conversations` of them, round robin, so every turn
  sends a full `HISTORY_MAX_MESSAGES` window once they are long);
* `/api/chat/stream` on the same conversations, read to the end;
* streams the client cuts after the first chunk (connection closed);
* streams the upstream cuts (`X-Fault: after_chunks=2` on the first model: fallback);
* the OpenAI-compatible facade, plain and streamed, with a multi-message body.

Usage: .venv/bin/python bench/soak.py [--requests 30000] [--every 10000] [--concurrency 8]

Bounded: the run stops after `--requests` requests or `--max-seconds`, whichever comes first,
and the service is stopped (by its process id) on every exit path.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

FACADE_MESSAGES = [
    {"role": "system", "content": "Responda em português."},
    {"role": "user", "content": "Qual é a capital do Brasil?"},
    {"role": "assistant", "content": "Brasília."},
    {"role": "user", "content": "E a maior cidade?"},
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Service:
    """`python -m rom_agent serve` in its own process group, stopped by its id."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "LOG_LEVEL": "warning",
            "DATABASE_URL": f"sqlite:///{workdir / 'soak.db'}",
            "ENABLE_FAULT_INJECTION": "true",
            "MAX_CONCURRENT": "64",
            "MAX_QUEUE": "256",
        }
        self._log = (workdir / "service.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rom_agent", "serve"],
            env=env,
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,
        )

    async def wait_healthy(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}")
            try:
                async with session.get(self.url + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)  # polling for startup
        raise RuntimeError("the service did not become healthy")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


Request = Callable[[aiohttp.ClientSession, str, int], Awaitable[str]]


async def chat(session: aiohttp.ClientSession, url: str, n: int, conversations: int) -> str:
    body = {
        "message": f"Pergunta número {n}: como vai?",
        "conversationId": f"soak-{n % conversations}",
    }
    async with session.post(url + "/api/chat", json=body) as response:
        await response.read()
        return f"chat {response.status}"


async def stream(
    session: aiohttp.ClientSession,
    url: str,
    n: int,
    conversations: int,
    *,
    client_cut: bool = False,
    upstream_cut: bool = False,
) -> str:
    body = {
        "message": f"Conte uma história curta ({n})",
        "conversationId": f"soak-{n % conversations}",
    }
    headers = {"X-Fault": "after_chunks=2;models=rom-sim-1"} if upstream_cut else {}
    kind = (
        "stream-client-cut" if client_cut else "stream-upstream-cut" if upstream_cut else "stream"
    )
    async with session.post(url + "/api/chat/stream", json=body, headers=headers) as response:
        if client_cut:
            async for line in response.content:
                if b'"chunk"' in line:
                    break
            response.close()  # the client leaves mid-stream
            return f"{kind} {response.status}"
        ending = "none"
        async for line in response.content:
            if line.startswith(b"data: "):
                ending = json.loads(line[6:]).get("type", "none")
        return f"{kind} {response.status} {ending}"


async def facade(session: aiohttp.ClientSession, url: str, n: int, *, streamed: bool) -> str:
    body = {"model": "rom-sim-1", "messages": FACADE_MESSAGES, "stream": streamed}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        await response.read()
        return f"facade{'-stream' if streamed else ''} {response.status}"


def the_mix(
    conversations: int,
) -> list[Callable[[aiohttp.ClientSession, str, int], Awaitable[str]]]:
    """Ten requests: 4 chat, 2 streams, 1 client-cut stream, 1 upstream-cut stream, 2 facade."""

    def c(s: aiohttp.ClientSession, u: str, n: int) -> Awaitable[str]:
        return chat(s, u, n, conversations)

    def st(s: aiohttp.ClientSession, u: str, n: int) -> Awaitable[str]:
        return stream(s, u, n, conversations)

    def client_cut(s: aiohttp.ClientSession, u: str, n: int) -> Awaitable[str]:
        return stream(s, u, n, conversations, client_cut=True)

    def upstream_cut(s: aiohttp.ClientSession, u: str, n: int) -> Awaitable[str]:
        return stream(s, u, n, conversations, upstream_cut=True)

    def plain_facade(s: aiohttp.ClientSession, u: str, n: int) -> Awaitable[str]:
        return facade(s, u, n, streamed=False)

    def streamed_facade(s: aiohttp.ClientSession, u: str, n: int) -> Awaitable[str]:
        return facade(s, u, n, streamed=True)

    return [c, st, c, client_cut, c, upstream_cut, c, st, plain_facade, streamed_facade]


async def soak(
    requests: int, every: int, concurrency: int, conversations: int, max_s: float
) -> dict:
    with tempfile.TemporaryDirectory(prefix="rom-soak-") as scratch:
        service = Service(Path(scratch))
        try:
            connector = aiohttp.TCPConnector(limit=concurrency)
            timeout = aiohttp.ClientTimeout(total=60)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                await service.wait_healthy(session)
                pid = service.process.pid
                samples = [{"requests": 0, "rss_mb": round(rss_mb(pid), 1), "seconds": 0.0}]
                print(f"start: RSS {samples[0]['rss_mb']} MB", flush=True)
                mix = the_mix(conversations)
                counter = itertools.count()
                outcomes: Counter[str] = Counter()
                done = 0
                started = time.monotonic()
                stop_at = started + max_s

                async def client() -> None:
                    nonlocal done
                    while time.monotonic() < stop_at:
                        n = next(counter)
                        if n >= requests:
                            return
                        try:
                            outcomes[await mix[n % len(mix)](session, service.url, n)] += 1
                        except (aiohttp.ClientError, TimeoutError) as exc:
                            outcomes[f"client error {type(exc).__name__}"] += 1
                        done += 1
                        if done % every == 0:
                            sample = {
                                "requests": done,
                                "rss_mb": round(rss_mb(pid), 1),
                                "seconds": round(time.monotonic() - started, 1),
                            }
                            samples.append(sample)
                            print(
                                f"after {done:,} requests ({sample['seconds']} s): "
                                f"RSS {sample['rss_mb']} MB",
                                flush=True,
                            )

                await asyncio.gather(*(client() for _ in range(concurrency)))
                elapsed = time.monotonic() - started
        finally:
            service.stop()
    return {
        "requests": done,
        "seconds": round(elapsed, 1),
        "concurrency": concurrency,
        "conversations": conversations,
        "samples": samples,
        "outcomes": dict(sorted(outcomes.items())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=30_000)
    parser.add_argument("--every", type=int, default=10_000, help="RSS sample interval")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--max-seconds", type=float, default=600, help="hard bound on the run")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = asyncio.run(
        soak(args.requests, args.every, args.concurrency, args.conversations, args.max_seconds)
    )
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
