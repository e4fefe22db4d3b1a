"""Server CPU per request: single-process mode vs fleet mode (issue 15), side by side.

Starts `rom-agent serve` once per mode on loopback and sends the same number of /api/chat
requests (simulator, no latency, bottleneck on) at a fixed concurrency, reading the server's
own CPU time (utime + stime from /proc) before and after. Modes:

* single-sqlite — the embedded default (SQLite, no Redis);
* single-pg     — PostgreSQL, no Redis, ADMISSION_SCOPE=replica;
* fleet         — PostgreSQL + Redis, ADMISSION_SCOPE=fleet (one admission script per request,
                  release after the response, registry heartbeats, flag poll).

Needs PostgreSQL and Redis (ROM_TEST_PG_URL / ROM_TEST_REDIS_URL as for the tests). Short by
design; on a shared machine run it a few times and compare ratios, not absolute numbers.

Usage: .venv/bin/python bench/fleet_cpu.py [--requests 2000] [--concurrency 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.engines import PG_ADMIN_URL, REDIS_URL, database_url
from tests.server import free_port

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def drive(url: str, requests: int, concurrency: int) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        queue = iter(range(requests))

        async def worker() -> None:
            for i in queue:
                response = await http.post(url + "/api/chat", json={"message": f"m{i}"})
                assert response.status_code == 200, response.text

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def measure(env: dict[str, str], requests: int, concurrency: int, workdir: str) -> float:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "rom_agent", "serve"],
        env={**os.environ, **env, "PORT": str(port), "HOST": "127.0.0.1", "LOG_LEVEL": "warning"},
        cwd=workdir,
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        asyncio.run(drive(url, 200, concurrency))  # warm up
        before = cpu_seconds(process.pid)
        asyncio.run(drive(url, requests, concurrency))
        return (cpu_seconds(process.pid) - before) / requests * 1e6
    finally:
        process.terminate()
        process.wait(timeout=30)


async def admin(statement: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    name = f"rom_bench_{uuid.uuid4().hex[:8]}"
    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    common = {"ENABLE_BOTTLENECK": "true", "MAX_CONCURRENT": "50", "MAX_QUEUE": "100"}
    try:
        with tempfile.TemporaryDirectory() as workdir:
            modes = {
                "single-sqlite": {**common, "DATABASE_URL": f"sqlite:///{workdir}/bench.db"},
                "single-pg": {**common, "DATABASE_URL": database_url(name)},
                "fleet": {
                    **common,
                    "DATABASE_URL": database_url(name),
                    "REDIS_URL": REDIS_URL,
                    "FLEET_KEY_PREFIX": f"rombench:{uuid.uuid4().hex[:8]}:",
                    "ADMISSION_SCOPE": "fleet",
                },
            }
            results: dict[str, list[float]] = {mode: [] for mode in modes}
            for _ in range(args.rounds):
                for mode, env in modes.items():
                    results[mode].append(measure(env, args.requests, args.concurrency, workdir))
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    for mode, values in results.items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        print(f"{mode:14s} server CPU per request: {min(values):.0f} µs (runs: {shown})")
    base = min(results["single-pg"])
    print(f"fleet / single-pg: {min(results['fleet']) / base:.2f}x")


if __name__ == "__main__":
    main()
