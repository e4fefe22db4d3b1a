"""Gateway benchmark: ours vs LiteLLM's proxy vs a bare pass-through, all on loopback.

Started by `bench/run.sh` (which installs wrk and LiteLLM first); see bench/README.md.

Layout on this 2-core machine: every gateway runs on CPU 0; the fake upstream, wrk and this
process (the open-loop generator) run on CPU 1. Each figure is measured in interleaved rounds
(bare, litellm, ours, ..., bare, litellm, ours, ...) and reported as the median of the rounds.

Phases (each bounded in requests and seconds):
  throughput  wrk, 32 connections, upstream delay 0: req/s and CPU-s per 1,000 requests
  streaming   the same with `"stream": true` (20 content chunks per answer)
  latency     open loop at 20 req/s, upstream delay 20 ms: p50/p99, added over the direct upstream
  curve       open loop at rising rates, upstream delay 20 ms: latency against offered load
  overload    ours with MAX_CONCURRENT=4, MAX_QUEUE=0, upstream delay 100 ms (capacity 40 req/s):
              20 req/s unloaded, then 400 req/s (10x): 503 latency and accepted latency
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / "work"
RESULTS = BENCH / "results"
PYTHON = ROOT / ".venv" / "bin" / "python"
LITELLM_BIN = BENCH / ".venv-litellm" / "bin" / "litellm"
LITELLM_VERSION = "1.108.7"

sys.path.insert(0, str(BENCH))
import flamegraph  # noqa: E402
import loadgen  # noqa: E402

HOST = "127.0.0.1"
GATEWAY_CPU = 0
LOAD_CPU = 1
MASTER_KEY = "sk-bench-master-key"  # LiteLLM's admin key, local only
DUMMY_UPSTREAM_KEY = "sk-bench-dummy"
MODEL = "bench-model"
STREAM_CHUNKS = 20
CLK_TCK = os.sysconf("SC_CLK_TCK")

BODY = orjson.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
        "max_tokens": 32,
    }
)
STREAM_BODY = orjson.dumps({**orjson.loads(BODY), "stream": True})

PORTS = {
    "upstream": 18100,
    "bare": 18101,
    "litellm": 18102,
    "ours": 18103,
    "ours_off": 18104,
    "ours_info": 18105,
    "ours_overload": 18106,
}

# Every flag on; admission limits high enough to admit the offered load.
OURS_ON = {
    "ENABLE_RETRY": "true",
    "ENABLE_CIRCUIT_BREAKER": "true",
    "ENABLE_BOTTLENECK": "true",
    "MAX_CONCURRENT": "64",
    "MAX_QUEUE": "256",
    "ENABLE_GUARDRAILS": "true",
    "GUARDRAIL_MODE": "full",
    "ENABLE_METRICS": "true",
}
OURS_OFF = {
    "ENABLE_RETRY": "false",
    "ENABLE_CIRCUIT_BREAKER": "false",
    "ENABLE_BOTTLENECK": "false",
    "ENABLE_GUARDRAILS": "false",
    "GUARDRAIL_MODE": "off",
    "ENABLE_METRICS": "false",
}
OVERLOAD_LIMITS = {"MAX_CONCURRENT": "4", "MAX_QUEUE": "0"}
OVERLOAD_DELAY_MS = 100  # capacity = 4 slots / 0.1 s = 40 req/s
OVERLOAD_CAPACITY = 40.0
RAW = "_samples_200"
INTERFERENCE_LIMIT = 0.25  # share of the gateway CPU taken by others before a window is redone
SATURATED_P50_MS = 100.0  # 5x the upstream delay


@dataclass(frozen=True)
class Plan:
    rounds: int  # latency and overload phases
    closed_rounds: int  # throughput and streaming phases (short windows, more rounds)
    throughput_s: float
    stream_s: float
    latency_s: float
    latency_rate: float
    curve_rates: tuple[float, ...]
    curve_s: float
    overload_s: float
    warmup_s: float


FULL = Plan(
    rounds=3,
    closed_rounds=5,
    throughput_s=5,
    stream_s=4,
    latency_s=10,
    latency_rate=20,
    curve_rates=(25, 50, 100, 200, 400, 800, 1600, 3200),
    curve_s=3,
    overload_s=6,
    warmup_s=3,
)
QUICK = Plan(
    rounds=1,
    closed_rounds=1,
    throughput_s=4,
    stream_s=3,
    latency_s=5,
    latency_rate=20,
    curve_rates=(50, 400, 3200),
    curve_s=2,
    overload_s=3,
    warmup_s=2,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- processes


def pin_to(cpu: int) -> Callable[[], None]:
    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return pin


@dataclass
class Service:
    key: str
    label: str
    port: int
    path: str = "/v1/chat/completions"
    health: str = "/health"
    auth: str = ""
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cpu: int = GATEWAY_CPU
    process: subprocess.Popen[bytes] | None = None
    status: str = "not started"  # ok | pending | failed: <why>
    rss: dict[str, float] = field(default_factory=dict)  # stage -> MB

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": self.auth} if self.auth else {}

    def start(self) -> None:
        WORK.mkdir(parents=True, exist_ok=True)
        logfile = (WORK / f"{self.key}.log").open("wb")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(WORK),
            "LANG": "C.UTF-8",
        }
        env.update(self.env)
        cwd = WORK / self.key
        cwd.mkdir(exist_ok=True)
        self.process = subprocess.Popen(
            self.command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            preexec_fn=pin_to(self.cpu),
            process_group=0,  # its own group, so workers it forks stop with it
        )
        logfile.close()

    def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                if http("GET", self.url + self.health)[0] == 200:
                    return True
            time.sleep(0.25)
        return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    check_loopback(url)
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def check_loopback(url: str) -> None:
    host = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"refusing to contact {url}: loopback only")


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_seconds(root: int) -> float:
    """utime + stime of the process and its descendants (all threads), from /proc/<pid>/stat."""
    ticks = 0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / CLK_TCK


def rss_mb(root: int) -> float:
    total_kb = 0
    for pid in process_tree(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return round(total_kb / 1024, 1)


def cpu_busy(cpu: int) -> float:
    """Busy seconds of one CPU (everything but idle and iowait), from /proc/stat."""
    prefix = f"cpu{cpu} "
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(prefix):
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line.split()[1:9])
            return (user + nice + system + irq + softirq + steal) / CLK_TCK
    return 0.0


def settle(limit_s: float = 30.0) -> None:
    """Wait (bounded) until the gateways' CPU is quiet: a gateway may still be draining a
    backlog from the last step, and other work on the machine may be passing."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        before = cpu_busy(GATEWAY_CPU)
        time.sleep(0.3)
        if cpu_busy(GATEWAY_CPU) - before < 0.03:  # under 10 % of the core
            return


@contextlib.contextmanager
def window(service: Service) -> Iterator[dict[str, float]]:
    """Measure one load window: the gateway's CPU-seconds, and the share of the gateway CPU
    used by anything else (other processes, interrupts, steal) — the interference."""
    settle()
    gateway = service.process is not None
    out: dict[str, float] = {}
    cpu_before = cpu_seconds(service.pid) if gateway else 0.0
    busy_before, began = cpu_busy(GATEWAY_CPU), time.monotonic()
    yield out
    elapsed = time.monotonic() - began
    cpu = cpu_seconds(service.pid) - cpu_before if gateway else 0.0
    out["cpu_s"] = cpu
    if service.cpu == GATEWAY_CPU:  # the direct upstream runs on the other CPU
        foreign = cpu_busy(GATEWAY_CPU) - busy_before - cpu
        out["foreign_cpu0"] = round(max(0.0, foreign) / elapsed, 3)
    else:
        out["foreign_cpu0"] = 0.0


# --------------------------------------------------------------------------- load


def set_upstream_delay(ms: float) -> None:
    status, _ = http("POST", f"http://{HOST}:{PORTS['upstream']}/_bench/delay?ms={ms:g}", b"")
    if status != 200:
        raise RuntimeError(f"upstream did not accept the delay ({status})")


def start_wrk(
    service: Service, body: bytes, duration_s: float, connections: int = 32
) -> subprocess.Popen[str]:
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",  # wrk takes whole seconds
        "--timeout",
        "10s",
        "-s",
        str(BENCH / "post.lua"),
        service.url + service.path,
    ]
    return subprocess.Popen(
        command,
        env=dict(os.environ, BENCH_BODY=body.decode(), BENCH_AUTH=service.auth),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=pin_to(LOAD_CPU),
    )


def wrk_result(process: subprocess.Popen[str], duration_s: float) -> dict[str, Any]:
    try:
        stdout, stderr = process.communicate(timeout=duration_s + 30)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    for line in stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            return result
    raise RuntimeError(f"wrk gave no summary: {stdout[-500:]} {stderr[-500:]}")


def wrk(service: Service, body: bytes, duration_s: float, connections: int = 32) -> dict[str, Any]:
    return wrk_result(start_wrk(service, body, duration_s, connections), duration_s)


def side_by_side(a: Service, b: Service, body: bytes, duration_s: float) -> dict[str, Any]:
    """Load two gateways at once (16 connections each, both on CPU 0): whatever the shared
    machine does during the window, it does to both, so the ratio of their CPU per request is
    far steadier than one from windows measured one after the other."""
    settle()
    before = {s.key: cpu_seconds(s.pid) for s in (a, b)}
    runs = {s.key: start_wrk(s, body, duration_s, connections=16) for s in (a, b)}
    results = {key: wrk_result(process, duration_s) for key, process in runs.items()}
    out: dict[str, Any] = {}
    for service in (a, b):
        requests = max(1, results[service.key]["requests"])
        cpu = cpu_seconds(service.pid) - before[service.key]
        out[f"{service.key}_cpu_s_per_1k"] = round(cpu * 1000 / requests, 4)
        out[f"{service.key}_non_2xx"] = results[service.key]["non_2xx"]
    out["ratio"] = round(out[f"{a.key}_cpu_s_per_1k"] / out[f"{b.key}_cpu_s_per_1k"], 4)
    return out


def side_by_side_phase(
    count: int, pairs: list[tuple[Service, Service]], duration_s: float
) -> dict[str, Any]:
    phase: dict[str, Any] = {}
    for a, b in pairs:
        rounds = []
        for number in range(1, count + 1):
            row = side_by_side(a, b, BODY, duration_s)
            rounds.append(row)
            log(f"side by side round {number} {a.key} / {b.key}: CPU ratio {row['ratio']}")
        phase[f"{a.key}_over_{b.key}"] = {
            "rounds": rounds,
            "median_ratio": median([r["ratio"] for r in rounds]),
        }
    return phase


def closed_loop(service: Service, body: bytes, duration_s: float) -> dict[str, Any]:
    """wrk at 32 connections; req/s and CPU-s per 1,000 requests of the gateway."""
    with window(service) as measured:
        result = wrk(service, body, duration_s)
    cpu = measured["cpu_s"]
    requests = max(1, result["requests"])
    seconds = result["duration_us"] / 1e6
    return {
        "rps": round(requests / seconds, 1),
        "cpu_s_per_1k": round(cpu * 1000 / requests, 3) if service.process else None,
        "foreign_cpu0": measured["foreign_cpu0"],
        "non_2xx": result["non_2xx"],
        "socket_errors": result["connect_errors"] + result["read_errors"] + result["timeouts"],
        "p50_ms": round(result["p50_us"] / 1000, 3),
        "p99_ms": round(result["p99_us"] / 1000, 3),
    }


def open_loop(service: Service, rate: float, duration_s: float) -> dict[str, Any]:
    with window(service) as measured:
        run = uvloop.run(
            loadgen.run(
                HOST,
                service.port,
                service.path,
                rate,
                duration_s,
                body=BODY,
                headers=service.headers,
                max_connections=1024,
                timeout_s=10.0,
            )
        )
    summary = run.summary()
    if service.process:
        summary["cpu_s_per_1k"] = round(measured["cpu_s"] * 1000 / max(1, run.completed), 3)
    summary["foreign_cpu0"] = measured["foreign_cpu0"]
    summary[RAW] = run.ok()  # taken out before the results are written
    return summary


def pooled(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Percentiles over the samples of every round together (p99 of a few hundred samples per
    round is too noisy alone); removes the raw samples from the rounds."""
    samples = [x for r in rounds for x in r.pop(RAW, [])]
    return loadgen.percentiles(samples)


def robust(step: Callable[[], dict[str, Any]], what: str) -> dict[str, Any]:
    """Run a window; run it once more if something else took a big share of the gateway CPU."""
    result = step()
    if result.get("foreign_cpu0", 0) > INTERFERENCE_LIMIT:
        log(f"{what}: {result['foreign_cpu0']:.0%} of CPU {GATEWAY_CPU} used by others; again")
        again = step()
        again["repeated"] = True
        if again.get("foreign_cpu0", 0) <= result["foreign_cpu0"]:
            result = again
    return result


def paired(rounds: dict[str, list[dict[str, Any]]], a: str, b: str, key: str) -> float | None:
    """Median over rounds of a[key] / b[key]: each ratio compares windows minutes apart at
    most, so slow drifts of the shared machine cancel out."""
    if a not in rounds or b not in rounds:
        return None
    ratios = [
        x[key] / y[key]
        for x, y in zip(rounds[a], rounds[b], strict=False)
        if x.get(key) and y.get(key)
    ]
    return round(statistics.median(ratios), 3) if ratios else None


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def medians(rounds: list[dict[str, Any]], keys: list[str]) -> dict[str, float | None]:
    return {key: median([r.get(key) for r in rounds]) for key in keys}


def lat(summary: dict[str, Any], status: int, q: str) -> float | None:
    value = summary.get(f"latency_ms_{status}", {}).get(q)
    return float(value) if value is not None else None


# --------------------------------------------------------------------------- services


def ours_service(key: str, label: str, flags: dict[str, str], ours_path: str) -> Service:
    db = WORK / key / "rom-agent.db"
    env = {
        "HOST": HOST,
        "PORT": str(PORTS[key]),
        "MODEL_CHAIN": f"openai/{MODEL}",
        "OPENAI_BASE_URL": f"http://{HOST}:{PORTS['upstream']}/v1",
        "OPENAI_API_KEY": DUMMY_UPSTREAM_KEY,
        "LOG_LEVEL": "warning",
        "DATABASE_URL": f"sqlite:///{db}",
        "PYTHONPATH": str(ROOT / "src"),
        **flags,
    }
    return Service(
        key=key,
        label=label,
        port=PORTS[key],
        path=ours_path,
        command=[str(PYTHON), "-m", "rom_agent", "serve"],
        env=env,
    )


def litellm_service() -> Service:
    config = WORK / "litellm.yaml"
    WORK.mkdir(parents=True, exist_ok=True)
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: http://{HOST}:{PORTS['upstream']}/v1\n"
        "      api_key: os.environ/OPENAI_API_KEY\n"
        "general_settings:\n"
        f"  master_key: {MASTER_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    return Service(
        key="litellm",
        label=f"LiteLLM proxy {LITELLM_VERSION}",
        port=PORTS["litellm"],
        health="/health/liveliness",
        auth=f"Bearer {MASTER_KEY}",
        command=[
            str(LITELLM_BIN),
            "--config",
            str(config),
            "--host",
            HOST,
            "--port",
            str(PORTS["litellm"]),
            "--num_workers",
            "1",
        ],
        env={
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "OPENAI_API_KEY": DUMMY_UPSTREAM_KEY,
        },
    )


def build_services(args: argparse.Namespace) -> tuple[Service, list[Service], Service | None]:
    upstream = Service(
        key="upstream",
        label="direct upstream",
        port=PORTS["upstream"],
        command=[
            str(PYTHON),
            str(BENCH / "upstream.py"),
            "--port",
            str(PORTS["upstream"]),
            "--stream-chunks",
            str(STREAM_CHUNKS),
        ],
        cpu=LOAD_CPU,
    )
    gateways: list[Service] = []
    overload: Service | None = None
    wanted = set(args.gateways)
    if "bare" in wanted:
        gateways.append(
            Service(
                key="bare",
                label="bare pass-through (aiohttp)",
                port=PORTS["bare"],
                command=[
                    str(PYTHON),
                    str(BENCH / "bare_proxy.py"),
                    "--port",
                    str(PORTS["bare"]),
                    "--upstream",
                    upstream.url,
                ],
            )
        )
    if "litellm" in wanted:
        gateways.append(litellm_service())
    if "ours" in wanted:
        gateways.append(ours_service("ours", "ours, every flag on", OURS_ON, args.ours_path))
        gateways.append(ours_service("ours_off", "ours, every flag off", OURS_OFF, args.ours_path))
        if args.info:
            info = {**OURS_ON, "LOG_LEVEL": "info"}
            gateways.append(
                ours_service("ours_info", "ours, flags on, LOG_LEVEL=info", info, args.ours_path)
            )
        # LOG_LEVEL=info: its access log gives the server-side duration of every request.
        overload_env = {**OURS_ON, **OVERLOAD_LIMITS, "LOG_LEVEL": "info", "LOG_FORMAT": "json"}
        overload = ours_service(
            "ours_overload", "ours, bottleneck 4/0", overload_env, args.ours_path
        )
    return upstream, gateways, overload


def start_all(upstream: Service, services: list[Service]) -> None:
    busy = [s.port for s in [upstream, *services] if not port_free(s.port)]
    if busy:
        raise SystemExit(f"ports already in use on {HOST}: {busy} (a previous run still up?)")
    upstream.start()
    if not upstream.wait_ready(15):
        raise SystemExit(f"the fake upstream did not start; see {WORK / 'upstream.log'}")
    upstream.status = "ok"
    for service in services:
        log(f"starting {service.label} on :{service.port}")
        if service.key == "litellm" and not LITELLM_BIN.exists():
            service.status = "failed: LiteLLM venv missing (run bench/run.sh)"
            continue
        service.start()
    for service in services:
        if service.process is None:
            continue
        if not service.wait_ready(90):
            service.status = f"failed: did not become ready (see bench/work/{service.key}.log)"
            service.stop()
            continue
        status, body = http("POST", service.url + service.path, BODY, service.headers)
        if status == 200 and b"choices" in body:
            service.status = "ok"
        elif service.key.startswith("ours") and status in (404, 405):
            service.status = f"pending: {service.path} answered {status}"
            service.stop()
        else:
            service.status = f"failed: probe answered {status}: {body[:200]!r}"
            service.stop()
        log(f"{service.label}: {service.status}")


def warm_up(service: Service, seconds: float) -> None:
    for _ in range(20):
        http("POST", service.url + service.path, BODY, service.headers)
    settle()
    service.rss["idle"] = rss_mb(service.pid)
    wrk(service, BODY, seconds)
    wrk(service, STREAM_BODY, max(1.0, seconds / 2))
    settle()
    service.rss["warm"] = rss_mb(service.pid)


# --------------------------------------------------------------------------- phases


def interleaved(
    count: int, services: list[Service], step: Callable[[Service], dict[str, Any]], name: str
) -> dict[str, list[dict[str, Any]]]:
    rounds: dict[str, list[dict[str, Any]]] = {s.key: [] for s in services}
    for number in range(1, count + 1):
        for service in services:
            result = robust(lambda s=service: step(s), f"{name} {service.key}")
            rounds[service.key].append(result)
            log(f"{name} round {number} {service.key}: {brief(result)}")
    return rounds


def brief(result: dict[str, Any]) -> str:
    keys = ("rps", "cpu_s_per_1k", "non_2xx", "achieved_rps", "statuses")
    parts = [f"{k}={result[k]}" for k in keys if k in result]
    for status in (200, 503):
        if f"latency_ms_{status}" in result:
            parts.append(
                f"{status}:p50={lat(result, status, 'p50')} p99={lat(result, status, 'p99')}"
            )
    return " ".join(parts)


def curve(plan: Plan, series: list[Service]) -> dict[str, list[dict[str, Any]]]:
    points: dict[str, list[dict[str, Any]]] = {s.key: [] for s in series}
    saturated: set[str] = set()
    for rate in plan.curve_rates:
        for service in series:
            if service.key in saturated:
                continue
            summary = robust(
                lambda s=service, r=rate: open_loop(s, r, plan.curve_s), f"curve {service.key}"
            )
            statuses = summary["statuses"]
            total = sum(statuses.values()) or 1
            errors = total - statuses.get("200", 0)
            point = {
                "offered_rps": rate,
                "achieved_rps": summary["achieved_rps"],
                "p50_ms": lat(summary, 200, "p50"),
                "p99_ms": lat(summary, 200, "p99"),
                "error_share": round(errors / total, 4),
                "max_lateness_ms": summary["max_lateness_ms"],
                "foreign_cpu0": summary["foreign_cpu0"],
            }
            points[service.key].append(point)
            log(f"curve {service.key} @{rate:g}/s: {point}")
            p50 = point["p50_ms"]
            # Saturated: queueing shows in the median, or errors; a p99 spike alone is not.
            if errors / total > 0.01 or p50 is None or p50 > SATURATED_P50_MS:
                point["saturated"] = True
                saturated.add(service.key)
                settle(60)
    return points


def flame_graphs(plan: Plan, service: Service) -> dict[str, dict[str, str]]:
    """py-spy flame graphs of ours under the throughput and the streaming load, taken in extra
    windows after the measured rounds (sampling costs the gateway a little CPU)."""
    out: dict[str, dict[str, str]] = {}
    for name, body, seconds in (
        ("throughput", BODY, plan.throughput_s),
        ("streaming", STREAM_BODY, plan.stream_s),
    ):
        svg = RESULTS / f"flame-{name}.svg"
        settle()
        status = flamegraph.record(
            service.pid,
            svg,
            seconds,
            lambda b=body, s=seconds: wrk(service, b, s + 1),  # outlasts the sampler
            pin_to(LOAD_CPU),
        )
        out[name] = {"svg": str(svg.relative_to(ROOT)), "status": status}
        log(f"flame graph {name}: {status} ({svg.relative_to(ROOT)})")
    return out


def overload_phase(plan: Plan, service: Service, upstream: Service) -> dict[str, Any]:
    unloaded_rate, overload_rate = OVERLOAD_CAPACITY / 2, OVERLOAD_CAPACITY * 10
    rounds: list[dict[str, Any]] = []
    for number in range(1, plan.rounds + 1):
        # The generator's own floor at this rate: the direct upstream answering at once.
        set_upstream_delay(0)
        floor = open_loop(upstream, overload_rate, plan.overload_s)
        set_upstream_delay(OVERLOAD_DELAY_MS)
        calm = robust(lambda: open_loop(service, unloaded_rate, plan.overload_s), "unloaded")
        offset = (WORK / f"{service.key}.log").stat().st_size
        storm = open_loop(service, overload_rate, plan.overload_s)
        server = server_durations(WORK / f"{service.key}.log", offset, service.path)
        row = {
            "unloaded_p50_ms": lat(calm, 200, "p50"),
            "unloaded_p99_ms": lat(calm, 200, "p99"),
            "unloaded_statuses": calm["statuses"],
            "accepted_p50_ms": lat(storm, 200, "p50"),
            "accepted_p99_ms": lat(storm, 200, "p99"),
            "rejected_p50_ms": lat(storm, 503, "p50"),
            "rejected_p99_ms": lat(storm, 503, "p99"),
            "server_rejected_p50_ms": server.get(503, {}).get("p50"),
            "server_rejected_p99_ms": server.get(503, {}).get("p99"),
            "server_accepted_p50_ms": server.get(200, {}).get("p50"),
            "server_accepted_p99_ms": server.get(200, {}).get("p99"),
            "generator_floor_p50_ms": lat(floor, 200, "p50"),
            "generator_floor_p99_ms": lat(floor, 200, "p99"),
            "foreign_cpu0": storm["foreign_cpu0"],
            "statuses": storm["statuses"],
            "accepted_rps": round(storm["statuses"].get("200", 0) / storm["elapsed_s"], 1),
        }
        rounds.append(row)
        log(f"overload round {number}: {row}")
    keys = [k for k in rounds[0] if k.endswith("_ms") or k == "accepted_rps"]
    return {
        "limits": {"max_concurrent": 4, "max_queue": 0},
        "upstream_delay_ms": OVERLOAD_DELAY_MS,
        "capacity_rps": OVERLOAD_CAPACITY,
        "unloaded_rps": unloaded_rate,
        "offered_rps": overload_rate,
        "rounds": rounds,
        "median": medians(rounds, keys),
    }


def server_durations(logfile: Path, offset: int, path: str) -> dict[int, dict[str, float]]:
    """Percentiles of `duration_ms` per status from our JSON access log, written after `offset`."""
    samples: dict[int, list[float]] = {}
    with logfile.open("rb") as handle:
        handle.seek(offset)
        for line in handle:
            if b'"request"' not in line:
                continue
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if entry.get("event") == "request" and entry.get("path") == path:
                samples.setdefault(int(entry["status"]), []).append(entry["duration_ms"] / 1000)
    return {status: loadgen.percentiles(values) for status, values in samples.items()}


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": (wrk_version.stdout or wrk_version.stderr).split(" Copyright")[0].strip()
        if shutil.which("wrk")
        else "",
        "commit": commit + ("+dirty" if dirty else ""),
        "load_average_at_start": os.getloadavg(),
    }


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> Path:
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = Plan(**{**plan.__dict__, "rounds": args.rounds, "closed_rounds": args.rounds})
    os.sched_setaffinity(0, {LOAD_CPU})
    started = time.monotonic()
    upstream, gateways, overload = build_services(args)
    everything = [*gateways, *([overload] if overload else [])]
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(),
        "pinning": {"gateways": f"CPU {GATEWAY_CPU}", "upstream_and_load": f"CPU {LOAD_CPU}"},
        "plan": plan.__dict__,
        "body_bytes": len(BODY),
        "stream_chunks": STREAM_CHUNKS,
        "gateways": {},
    }
    try:
        start_all(upstream, everything)
        live = [g for g in gateways if g.status == "ok"]
        for service in everything:
            results["gateways"][service.key] = {"label": service.label, "status": service.status}
        set_upstream_delay(0)
        for service in [*live, *([overload] if overload and overload.status == "ok" else [])]:
            log(f"warming up {service.key}")
            warm_up(service, plan.warmup_s)

        log("phase: throughput (32 connections, upstream delay 0)")
        set_upstream_delay(0)
        # wrk against the upstream itself (both on CPU 1): the ceiling of the load setup.
        ceiling = closed_loop(upstream, BODY, plan.warmup_s)
        log(f"wrk against the direct upstream: {brief(ceiling)}")
        tp = interleaved(
            plan.closed_rounds,
            live,
            lambda s: closed_loop(s, BODY, plan.throughput_s),
            "throughput",
        )

        by_key = {g.key: g for g in live}
        pairs = [
            (by_key[a], by_key[b])
            for a, b in (("ours", "ours_off"), ("ours_info", "ours"))
            if a in by_key and b in by_key
        ]
        if pairs:
            log("phase: side by side (two gateways loaded at once, 16 connections each)")
            results["side_by_side"] = side_by_side_phase(
                plan.closed_rounds, pairs, plan.throughput_s
            )

        log("phase: streaming (32 connections, upstream delay 0)")
        st = interleaved(
            plan.closed_rounds,
            live,  # ours_info too: issue 19's stream target is at LOG_LEVEL=info
            lambda s: closed_loop(s, STREAM_BODY, plan.stream_s),
            "stream",
        )
        if "ours" in by_key and not args.no_flame:
            results["flame_graphs"] = flame_graphs(plan, by_key["ours"])

        log(f"phase: latency at {plan.latency_rate:g} req/s, upstream delay 20 ms")
        set_upstream_delay(20)
        latency_targets = [upstream, *[g for g in live if g.key != "ours_info"]]
        lt = interleaved(
            plan.rounds,
            latency_targets,
            lambda s: open_loop(s, plan.latency_rate, plan.latency_s),
            "latency",
        )

        for service in live:
            service.rss["after"] = rss_mb(service.pid)
        log("phase: latency against offered load (upstream delay 20 ms)")
        curve_series = [upstream, *[g for g in live if g.key in ("bare", "litellm", "ours")]]
        cv = curve(plan, curve_series) if not args.no_curve else {}

        if overload is not None and overload.status == "ok":
            log("phase: overload (bottleneck 4 running / 0 queued, 10x capacity)")
            results["overload"] = overload_phase(plan, overload, upstream)
            results["overload"]["rss_mb"] = rss_mb(overload.pid)
        set_upstream_delay(0)

        results["paired"] = {
            f"{phase}_{key}_{a}_over_{b}": paired(data, a, b, key)
            for phase, data in (("throughput", tp), ("streaming", st))
            for key in ("rps", "cpu_s_per_1k")
            for a, b in (
                ("ours", "bare"),
                ("ours", "litellm"),
                ("ours", "ours_off"),
                ("ours_info", "bare"),
            )
        }
        results["paired"]["throughput_cpu_s_per_1k_ours_info_over_ours"] = paired(
            tp, "ours_info", "ours", "cpu_s_per_1k"
        )
        pools = {key: pooled(rounds) for key, rounds in lt.items()}
        direct = pools[upstream.key]
        direct_rounds = [
            {"p50": lat(r, 200, "p50"), "p99": lat(r, 200, "p99")} for r in lt[upstream.key]
        ]
        results["direct"] = {
            "throughput": ceiling,
            "latency": {
                "rounds": direct_rounds,
                "median": medians(direct_rounds, ["p50", "p99"]),
                "pooled": direct,
            },
        }
        results["direct"]["curve"] = cv.get(upstream.key, [])
        for service in live:
            entry = results["gateways"][service.key]
            entry["rss_idle_mb"] = service.rss.get("idle")
            entry["rss_warm_mb"] = service.rss.get("warm")
            entry["rss_after_mb"] = service.rss.get("after")
            entry["rss_after_curve_mb"] = rss_mb(service.pid)
            entry["throughput"] = {
                "rounds": tp[service.key],
                "median": medians(tp[service.key], ["rps", "cpu_s_per_1k", "p50_ms", "p99_ms"]),
            }
            if service.key in st:
                entry["streaming"] = {
                    "rounds": st[service.key],
                    "median": medians(st[service.key], ["rps", "cpu_s_per_1k"]),
                }
            if service.key in lt:
                rows = [
                    {
                        "p50_ms": lat(r, 200, "p50"),
                        "p99_ms": lat(r, 200, "p99"),
                        "cpu_s_per_1k": r.get("cpu_s_per_1k"),
                        "statuses": r["statuses"],
                    }
                    for r in lt[service.key]
                ]
                mid = medians(rows, ["p50_ms", "p99_ms", "cpu_s_per_1k"])
                pool = pools[service.key]
                for q in ("p50", "p99"):  # added latency: pooled samples, gateway minus direct
                    gw, base = pool.get(q), direct.get(q)
                    mid[f"pooled_{q}_ms"] = gw
                    mid[f"added_{q}_ms"] = (
                        round(gw - base, 3) if gw is not None and base is not None else None
                    )
                entry["latency"] = {"rate_rps": plan.latency_rate, "rounds": rows, "median": mid}
            if service.key in cv:
                entry["curve"] = cv[service.key]
    finally:
        for service in [*everything, upstream]:
            service.stop()
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    day = dt.date.today().isoformat()
    out = RESULTS / (f"{day}-quick.json" if args.quick else f"{day}.json")
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    log(f"results written to {out.relative_to(ROOT)} ({results['elapsed_s']} s)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Gateway benchmark (see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="one short round (~3 min)")
    parser.add_argument("--rounds", type=int, default=0, help="override the number of rounds")
    parser.add_argument(
        "--gateways",
        default="bare,litellm,ours",
        type=lambda v: [g.strip() for g in v.split(",") if g.strip()],
        help="comma-separated subset of bare,litellm,ours",
    )
    parser.add_argument("--ours-path", default="/v1/chat/completions")
    parser.add_argument(
        "--info",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure ours at LOG_LEVEL=info (default: on in full runs)",
    )
    parser.add_argument("--no-curve", action="store_true", help="skip the latency/load curve")
    parser.add_argument(
        "--no-flame", action="store_true", help="skip the py-spy flame graphs of ours"
    )
    parser.add_argument("--no-report", action="store_true", help="do not regenerate the doc")
    args = parser.parse_args()
    unknown = set(args.gateways) - {"bare", "litellm", "ours"}
    if unknown:
        parser.error(f"unknown gateways: {sorted(unknown)}")
    if args.info is None:
        args.info = not args.quick
    out = run(args)
    if not args.no_report:
        import report

        report.write(out)


if __name__ == "__main__":
    main()
