"""Renders the Grafana dashboard's panels from a real run, without Grafana (not packaged here).

Starts `rom-agent serve` (simulator chain of three models, every protection on), the real
Prometheus server from Debian's `prometheus` package scraping it every second with our alert
rules loaded, drives a scripted workload in phases, then asks Prometheus for each panel's own
PromQL (from deploy/grafana/rom-agent.json, Grafana variables substituted) over the run and
plots the answers with matplotlib in the dashboard's layout.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python scripts/render_dashboard.py docs/img/dashboard.png
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.server import ServiceProcess, free_port  # noqa: E402
from tests.workload import WORKLOAD_ENV, chat, run_workload  # noqa: E402

MODELS = ("rom-sim-1", "rom-sim-2", "rom-sim-3")
SCRAPE_S = 1
RATE = "15s"  # Grafana's $__rate_interval for a 1 s scrape and a 2 s step


def start_prometheus(work: Path, target: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = work / "prometheus.yml"
    config.write_text(
        f"""global:
  scrape_interval: {SCRAPE_S}s
  evaluation_interval: {SCRAPE_S}s
rule_files:
  - {ROOT / "deploy" / "prometheus" / "rom-agent-rules.yml"}
scrape_configs:
  - job_name: rom-agent
    static_configs:
      - targets: ["{target}"]
"""
    )
    process = subprocess.Popen(
        [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(work / "prometheus.log").open("wb"),
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("prometheus did not start")


def workload(url: str, seconds: float) -> list[tuple[float, str]]:
    """Phases: steady traffic; a primary model failing (retries, fallbacks, breaker opens);
    a burst over the admission limits; steady again. Returns (time, phase) marks."""
    marks: list[tuple[float, str]] = []
    end = time.time() + seconds
    phases = ["steady", "rom-sim-1 failing", "burst", "steady"]
    per_phase = seconds / len(phases)
    with httpx.Client(base_url=url, timeout=30) as client:
        for phase in phases:
            marks.append((time.time(), phase))
            phase_end = min(end, time.time() + per_phase)
            while time.time() < phase_end:
                if phase == "steady":
                    chat(client, "hello", fault="delay_ms=150")
                    with client.stream("POST", "/api/chat/stream", json={"message": "hi"}) as r:
                        r.read()
                elif phase == "rom-sim-1 failing":
                    chat(client, "hello", fault="status=503;models=rom-sim-1")
                    time.sleep(0.05)  # pacing the load generator, not timing a behaviour
                else:
                    threads = [
                        threading.Thread(target=chat, args=(client, "burst", "delay_ms=700"))
                        for _ in range(6)
                    ]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
    return marks


def query_range(prom: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    answer = httpx.get(
        prom + "/api/v1/query_range",
        params={"query": expr, "start": start, "end": end, "step": 2},
        timeout=30,
    ).json()
    if answer["status"] != "success":
        raise RuntimeError(f"{expr}: {answer}")
    return list(answer["data"]["result"])


def legend(template: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        template = template.replace("{{" + key + "}}", value)
    return template


def plot(
    board: dict[str, Any],
    data: dict[int, list[tuple[str, list[Any]]]],
    out: Path,
    start: float,
    marks: list[tuple[float, str]],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in board["panels"] if p["type"] != "row"]
    columns = 2
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(16, 2.6 * rows))
    for ax, panel in zip(axes.flat, panels, strict=False):
        ax.set_title(panel["title"], fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        for name, values in data.get(panel["id"], []):
            xs = [float(t) - start for t, _ in values]
            ys = [float(v) for _, v in values]
            if panel["type"] == "state-timeline":
                ax.step(xs, ys, where="post", label=name)
            else:
                ax.plot(xs, ys, label=name, linewidth=1)
        for when, _ in marks:
            ax.axvline(when - start, color="grey", linewidth=0.5, linestyle=":")
        if panel["type"] == "state-timeline":
            mapping = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
            ax.set_yticks([int(k) for k in mapping], [v["text"] for v in mapping.values()])
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        ax.set_ylabel(unit, fontsize=7)
        if data.get(panel["id"]):
            ax.legend(fontsize=6, loc="upper left", ncol=2)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    phases = ", ".join(f"{phase} at {when - start:.0f}s" for when, phase in marks)
    figure.suptitle(
        "ROM Agent dashboard panels, rendered from Prometheus (no Grafana) — phases: " + phases,
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    figure.savefig(out, dpi=80)


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "docs" / "img" / "dashboard.png"
    seconds = float(argv[1]) if len(argv) > 1 else 120
    board = json.loads((ROOT / "deploy" / "grafana" / "rom-agent.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {
            **WORKLOAD_ENV,
            "CIRCUIT_BREAKER_COOLDOWN_S": "5",
            "QUEUE_TIMEOUT_S": "0.5",
            "DATABASE_URL": f"sqlite:///{work / 'db.sqlite'}",
            "KB_DIR": str(work / "kb"),
            "LOG_LEVEL": "warning",
        }
        service = ServiceProcess(env, work).start()
        prometheus, prom = start_prometheus(work, service.url.removeprefix("http://"))
        try:
            run_workload(service.url, MODELS)  # every path once (it opens every breaker)
            time.sleep(6)  # one breaker cooldown: the run starts with the breakers probing
            start = time.time()
            marks = workload(service.url, seconds)
            time.sleep(3 * SCRAPE_S)
            end = time.time()
            data: dict[int, list[tuple[str, list[Any]]]] = {}
            for panel in board["panels"]:
                for target in panel.get("targets", ()):
                    expr = (
                        target["expr"]
                        .replace("$__rate_interval", RATE)
                        .replace("$job", "rom-agent")
                        .replace("$instance", ".*")
                    )
                    for series in query_range(prom, expr, start, end):
                        name = legend(target["legendFormat"], series["metric"])
                        data.setdefault(panel["id"], []).append((name, series["values"]))
            alerts = httpx.get(prom + "/api/v1/alerts").json()["data"]["alerts"]
        finally:
            prometheus.terminate()
            prometheus.wait(10)
            service.stop()
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(board, data, out, start, marks)
    empty = [p["title"] for p in board["panels"] if p["type"] != "row" and p["id"] not in data]
    print(f"wrote {out}; panels with no data: {empty}")
    for alert in alerts:
        print(f"alert {alert['labels']['alertname']} {alert['state']} {alert['labels']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
