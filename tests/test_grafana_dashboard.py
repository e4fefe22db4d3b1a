"""The Grafana dashboard: importable JSON, unique panel ids, every PromQL expression accepted by
Prometheus's own parser (promtool), and every metric it reads present in a real /metrics scrape
of `rom-agent serve` after a short scripted workload."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.promtool import ROOT, run
from tests.server import ServiceProcess
from tests.workload import WORKLOAD_ENV, run_workload

DASHBOARD = ROOT / "deploy" / "grafana" / "rom-agent.json"
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": "rom-agent", "$instance": ".*"}
METRIC = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")
LABEL_VALUES = re.compile(r"^label_values\((.*),\s*\w+\)$")


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def expressions(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets, and the selectors of the query variables."""
    found = [target["expr"] for panel in board["panels"] for target in panel.get("targets", ())]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = LABEL_VALUES.match(variable["query"]["query"])
            assert match, variable["query"]
            found.append(match.group(1))
    return found


def as_promql(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def test_dashboard_is_the_generated_one() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/grafana_dashboard.py", "--check"], cwd=ROOT, capture_output=True
    )
    assert result.returncode == 0, result.stderr


def test_dashboard_is_importable_with_unique_panel_ids_and_variables() -> None:
    board = load()
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["instance"]["includeAll"] and variables["instance"]["multi"]
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])
    panels = [p for p in board["panels"] if p["type"] != "row"]
    print(f"\n{len(panels)} panels in {len(board['panels']) - len(panels)} rows")


def test_every_expression_parses_with_promtool(tmp_path: Path) -> None:
    exprs = expressions(load())
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expression_{i}", "expr": as_promql(expr)}
                    for i, expr in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run("check", "rules", path, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout
    print(f"\n{len(exprs)} PromQL expressions parsed by promtool")


def test_every_metric_name_is_in_a_real_scrape(tmp_path: Path) -> None:
    board = load()
    used = {name for expr in expressions(board) for name in METRIC.findall(expr)}
    assert len(used) > 20
    env = {
        **WORKLOAD_ENV,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "KB_DIR": str(tmp_path / "kb"),
        "LOG_LEVEL": "warning",
    }
    service = ServiceProcess(env, tmp_path).start()
    try:
        run_workload(service.url, ("rom-sim-1", "rom-sim-2", "rom-sim-3"))
        text = httpx.get(service.url + "/metrics").text
    finally:
        service.stop()
    with_samples: set[str] = set()
    declared: set[str] = set()
    for family in text_string_to_metric_families(text):
        declared.add(family.name + ("_total" if family.type == "counter" else ""))
        with_samples.update(sample.name for sample in family.samples)
    missing = sorted(name for name in used if name not in with_samples | declared)
    print(f"\n{len(used)} metric names used by the dashboard, all in the scrape:")
    for name in sorted(used):
        note = "" if name in with_samples else "  (declared, no sample yet)"
        print(f"  {name}{note}")
    assert not missing, f"not in /metrics: {missing}"
