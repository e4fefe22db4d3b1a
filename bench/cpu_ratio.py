"""CPU per request of ours over the bare pass-through, both loaded at once: a quick check of one
change that stays meaningful on a busy machine.

Starts the fake upstream, the bare proxy and ours (every flag on, `LOG_LEVEL=info` as issue 19
measures it) on free loopback ports, pinned like the benchmark, then loads ours and bare side by
side (two wrk, 16 connections each, same window) for a few rounds. Whatever else the machine
does during a window, it does to both, so the ratio moves far less than either figure alone;
the absolute CPU-seconds per 1,000 requests come from `/proc/<pid>/stat` (CPU time, not wall
clock). Not a substitute for `bench/run.sh`.

    .venv/bin/python bench/cpu_ratio.py [--stream] [--rounds 5] [--seconds 4] [--log-level info]
                                        [--src /tmp/before/src]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((harness.HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", action="store_true", help="streamed completions")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--src",
        type=Path,
        help="run ours from another checkout's src/ (the before of a change: "
        "`git archive main src | tar -x -C /tmp/before`, then --src /tmp/before/src)",
    )
    args = parser.parse_args()
    # Free ports, not the benchmark's fixed ones: a benchmark may be running beside this.
    for key in ("upstream", "bare", "ours"):
        harness.PORTS[key] = free_port()
    # The benchmark waits for a quiet CPU 0 before each window; on a busy machine it never is,
    # and a side-by-side ratio does not need it (both gateways share whatever is going on).
    harness.settle = lambda limit_s=0.0: None
    os.sched_setaffinity(0, {harness.LOAD_CPU})
    wanted = argparse.Namespace(gateways=["bare"], ours_path="/v1/chat/completions", info=False)
    upstream, gateways, _ = harness.build_services(wanted)
    flags = {**harness.OURS_ON, "LOG_LEVEL": args.log_level}
    ours = harness.ours_service("ours", "ours, every flag on", flags, wanted.ours_path)
    if args.src is not None:
        ours.env["PYTHONPATH"] = str(args.src.resolve())  # ahead of the venv's editable install
    services = [*gateways, ours]
    body = harness.STREAM_BODY if args.stream else harness.BODY
    try:
        harness.start_all(upstream, services)
        if any(s.status != "ok" for s in services):
            raise SystemExit(f"not ready: {[(s.key, s.status) for s in services]}")
        harness.set_upstream_delay(0)
        for service in services:
            harness.wrk(service, body, 2)  # warm-up
        bare = gateways[0]
        rounds = []
        for number in range(1, args.rounds + 1):
            row = harness.side_by_side(ours, bare, body, args.seconds)
            rounds.append(row)
            print(f"round {number}: {row}", flush=True)
    finally:
        for service in [*services, upstream]:
            service.stop()
    ours_cpu = statistics.median(r["ours_cpu_s_per_1k"] for r in rounds)
    bare_cpu = statistics.median(r["bare_cpu_s_per_1k"] for r in rounds)
    ratio = statistics.median(r["ratio"] for r in rounds)
    spread = max(r["ratio"] for r in rounds) - min(r["ratio"] for r in rounds)
    kind = "stream" if args.stream else "request"
    print(
        f"median CPU-s per 1k {kind}s: ours {ours_cpu:.3f}, bare {bare_cpu:.3f}; "
        f"ratio {ratio:.3f} (spread {spread:.3f} over {len(rounds)} rounds, "
        f"load average {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
