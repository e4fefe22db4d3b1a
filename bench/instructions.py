"""Instructions per request of ours and of the bare pass-through, counted by Valgrind: a
deterministic measure of one change on the hot path.

CPU time on a shared virtual machine moves by ±20 % from one run to the next, far more than
most changes on the hot path; the number of instructions a server executes for the same
requests barely moves (±1 %). Each gateway runs under `valgrind --tool=callgrind` (no cache
simulation, instrumentation off until the load starts), is warmed up, then receives exactly
`--requests` requests from a small closed-loop client (`--concurrency` at a time); the
instructions counted during that window are divided by the requests. Instructions are not
CPU time (a cache miss costs more than an add), so this complements `bench/cpu_ratio.py` and
`bench/run.sh`, it does not replace them.

    .venv/bin/python bench/instructions.py [--stream] [--requests 1000] [--src /tmp/before/src]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

_TOTAL = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((harness.HOST, 0))
        port: int = sock.getsockname()[1]
        return port


async def load(
    url: str, body: bytes, headers: dict[str, str], requests: int, concurrency: int
) -> int:
    """Sends `requests` requests, `concurrency` at a time; returns how many got a 200."""
    ok = 0
    remaining = requests
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            nonlocal ok, remaining
            while remaining > 0:
                remaining -= 1
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    ok += response.status == 200

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok


def callgrind(service: harness.Service, out: Path) -> None:
    """Runs `service` under callgrind, instrumenting nothing until told to."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is missing: apt-get install valgrind")
    service.command = [
        valgrind,
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        *service.command,
    ]


def control(service: harness.Service, *flags: str) -> None:
    # Valgrind names its control pipes after $HOST (ours reads it as its listen address).
    env = {k: v for k, v in os.environ.items() if k != "HOST"}
    if "HOST" in service.env:
        env["HOST"] = service.env["HOST"]
    command = ["callgrind_control", *flags, str(service.pid)]
    subprocess.run(command, check=True, capture_output=True, env=env)


def count(service: harness.Service, out: Path, body: bytes, args: argparse.Namespace) -> float:
    """Instructions per request of `service` (already started under callgrind)."""
    url = service.url + service.path
    headers = {"Content-Type": "application/json", **service.headers}
    asyncio.run(load(url, body, headers, args.warmup, args.concurrency))
    control(service, "-i", "on")
    ok = asyncio.run(load(url, body, headers, args.requests, args.concurrency))
    control(service, "-i", "off")
    control(service, "-d")
    if ok != args.requests:
        raise SystemExit(f"{service.key}: {args.requests - ok} requests failed")
    time.sleep(0.5)
    dumps = sorted(out.parent.glob(out.name + "*"), key=lambda p: p.stat().st_mtime)
    totals = [int(m) for path in dumps for m in _TOTAL.findall(path.read_bytes())]
    return sum(totals) / args.requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", action="store_true", help="streamed completions")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--no-bare", action="store_true", help="count ours only")
    parser.add_argument("--src", type=Path, help="run ours from another checkout's src/")
    args = parser.parse_args()
    for key in ("upstream", "bare", "ours"):
        harness.PORTS[key] = free_port()
    wanted = argparse.Namespace(
        gateways=[] if args.no_bare else ["bare"], ours_path="/v1/chat/completions", info=False
    )
    upstream, gateways, _ = harness.build_services(wanted)
    flags = {**harness.OURS_ON, "LOG_LEVEL": args.log_level}
    ours = harness.ours_service("ours", "ours, every flag on", flags, wanted.ours_path)
    if args.src is not None:
        # ahead of the venv's editable install; a `deps/` beside it holds what the old code
        # needed and the venv no longer has (`pip install --target <dir>/deps ...`)
        paths = [args.src.resolve(), args.src.resolve().parent / "deps"]
        ours.env["PYTHONPATH"] = ":".join(str(p) for p in paths if p.exists())
    services = [ours, *gateways]
    outs = {}
    for service in services:
        out = harness.WORK / f"callgrind-{service.key}.out"
        for stale in out.parent.glob(out.name + "*"):
            stale.unlink()
        callgrind(service, out)
        outs[service.key] = out
    body = harness.STREAM_BODY if args.stream else harness.BODY
    figures: dict[str, float] = {}
    try:
        harness.WORK.mkdir(parents=True, exist_ok=True)
        upstream.start()
        if not upstream.wait_ready(15):
            raise SystemExit("the fake upstream did not start")
        harness.set_upstream_delay(0)
        for service in services:
            service.start()
        for service in services:
            if not service.wait_ready(180):
                raise SystemExit(f"{service.key} did not start under valgrind")
            figures[service.key] = count(service, outs[service.key], body, args)
    finally:
        for service in [*services, upstream]:
            service.stop()
    kind = "stream" if args.stream else "request"
    line = ", ".join(f"{key} {value / 1e6:.3f}" for key, value in figures.items())
    print(f"M instructions per {kind}: {line}", end="")
    if "bare" in figures:
        print(f"; ratio {figures['ours'] / figures['bare']:.3f}")
    else:
        print()


if __name__ == "__main__":
    main()
