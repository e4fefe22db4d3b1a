"""CPU per request of the HTTP layer: the ASGI app driven in-process, no sockets.

    .venv/bin/python bench/http_overhead.py [--requests 5000] [--rounds 5]

Calls the application object exactly as uvicorn does (scope, receive, send) on uvloop, with the
simulator provider at zero latency, and prints the median process CPU µs per request of each
route over several rounds. Without sockets and a load generator sharing the CPU, the figures
are stable on a busy machine; they cover routing, middleware, the endpoint, the pipeline and
(for /api/chat) the store's commit.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from rom_agent.app import create_app, create_services
from rom_agent.config import load_settings
from rom_agent.logs import configure_logging

CASES: tuple[tuple[str, str, bytes], ...] = (
    ("GET", "/health", b""),
    ("GET", "/v1/models", b""),
    (
        "POST",
        "/v1/chat/completions",
        b'{"model":"rom-sim-1","messages":[{"role":"user","content":"Hi"}]}',
    ),
    ("POST", "/api/chat", b'{"mensagem":"oi"}'),
)


async def one_request(app: Any, method: str, path: str, body: bytes) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"bench"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
    }
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # never: the client stays
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def main(requests: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            database_url=f"sqlite:///{Path(tmp) / 'bench.db'}",
            log_level="warning",
            kb_dir=tmp,
        )
        configure_logging(settings.log_level, settings.log_format)
        services = create_services(settings)
        app = create_app(settings, services=services)
        await services.store.start()
        try:
            for method, path, body in CASES:
                assert await one_request(app, method, path, body) == 200, path
                figures = []
                for _ in range(rounds):
                    started = time.process_time()
                    for _ in range(requests):
                        await one_request(app, method, path, body)
                    figures.append((time.process_time() - started) / requests * 1e6)
                print(f"{method} {path}: {statistics.median(figures):.1f} µs CPU per request")
        finally:
            await services.store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    uvloop.run(main(args.requests, args.rounds))
