"""Where ours spends its CPU under load: py-spy on `rom-agent serve` while wrk loads it.

Starts the fake upstream and ours (every flag on, or off with `--flags off`) on loopback, pinned
like the benchmark, loads it with wrk (32 connections) and samples it with py-spy. Writes
`bench/results/profile-<flags>.json` (the shares the report shows) and keeps the raw
collapsed stacks in `bench/work/` for a flame graph.

    .venv/bin/pip install py-spy          # not a project dependency
    .venv/bin/python bench/profile.py [--flags on|off] [--seconds 15] [--stream]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]*)(?::\d+)?\)$")
_SITE = re.compile(r".*/(site-packages|python3\.\d+)/")


def frame_key(frame: str) -> tuple[str, str]:
    """(function, short file) of one py-spy frame `func (path:line)`."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip() or "(native)", ""
    path = _SITE.sub("", match["file"]).replace(str(harness.ROOT / "src") + "/", "")
    return match["func"], path


def package(path: str) -> str:
    if path.startswith("rom_agent/"):
        return "rom_agent/" + path.split("/")[1].removesuffix(".py")
    if "/" in path:
        return path.split("/")[0]
    return "stdlib: " + path.removesuffix(".py") if path else "native"


def summarise(raw: Path, top: int = 25) -> dict[str, object]:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [frame_key(f) for f in stack.split(";")]
        func, path = frames[-1]
        own[f"{func} ({path})"] += samples
        packages[package(path)] += samples
        for name in {f"{f} ({p})" for f, p in frames}:
            inclusive[name] += samples

    def share(counter: collections.Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, round(v / total * 100, 1)) for k, v in counter.most_common(n)]

    return {
        "samples": total,
        "by_package_pct": share(packages, 15),
        "self_pct": share(own, top),
        "inclusive_pct": share(inclusive, top + 20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flags", choices=("on", "off"), default="on")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--stream", action="store_true", help="profile streaming requests")
    parser.add_argument("--log-level", default="warning", help="LOG_LEVEL of ours")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(harness.ROOT / ".venv" / "bin" / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("py-spy missing: .venv/bin/pip install py-spy")
    seconds = max(3, min(args.seconds, 120))
    flags = harness.OURS_ON if args.flags == "on" else harness.OURS_OFF
    flags = {**flags, "LOG_LEVEL": args.log_level}
    nothing = argparse.Namespace(gateways=[], ours_path="/v1/chat/completions", info=False)
    upstream, _, _ = harness.build_services(nothing)
    ours = harness.ours_service("ours", f"ours, flags {args.flags}", flags, nothing.ours_path)
    os.sched_setaffinity(0, {harness.LOAD_CPU})
    name = f"profile-{args.flags}" + ("-stream" if args.stream else "")
    if args.log_level != "warning":
        name += f"-{args.log_level}"
    raw = harness.WORK / f"{name}.txt"
    body = harness.STREAM_BODY if args.stream else harness.BODY
    try:
        harness.start_all(upstream, [ours])
        if ours.status != "ok":
            raise SystemExit(f"ours: {ours.status}")
        harness.set_upstream_delay(0)
        harness.wrk(ours, body, 3)  # warm-up
        started = time.monotonic()
        record = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(ours.pid),
                "--duration",
                str(seconds),
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=harness.pin_to(harness.LOAD_CPU),
        )
        result = harness.wrk(ours, body, seconds + 1)
        record.wait(timeout=seconds + 30)
        elapsed = time.monotonic() - started
    finally:
        ours.stop()
        upstream.stop()
    summary = summarise(raw)
    summary.update(
        flags=args.flags,
        stream=args.stream,
        rps=round(result["requests"] / (result["duration_us"] / 1e6), 1),
        seconds=round(elapsed, 1),
        commit=harness.machine_info()["commit"],
    )
    out = harness.RESULTS / f"{name}.json"
    out.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    print(f"written to {out.relative_to(harness.ROOT)}; raw stacks in {raw}")


if __name__ == "__main__":
    main()
