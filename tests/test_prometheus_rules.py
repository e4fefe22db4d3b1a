"""The alert rules: valid for Prometheus, unit-tested with `promtool test rules`, and every alert
documented (summary, description, a runbook section that exists in docs/operations.md)."""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.promtool import ROOT, RULES_DIR, run

RULES = RULES_DIR / "rom-agent-rules.yml"
RULE_TESTS = (RULES_DIR / "rom-agent-rules.test.yml", RULES_DIR / "rom-agent-slo.test.yml")

# What the issue asks an alert for; each must exist under one of these names.
REQUIRED_ALERTS = {
    "RomAgentBreakerOpen",
    "RomAgentAllBreakersOpen",
    "RomAgentFallbackRatioHigh",
    "RomAgentQueueRejections",
    "RomAgentRetryBudgetExhausted",
    "RomAgentFaultInjectionEnabled",
    "RomAgentReplicaDown",
    "RomAgentSharedStateDegraded",
    "RomAgentErrorBudgetBurnFast",
    "RomAgentErrorBudgetBurnSlow",
}


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_promtool_check_rules_accepts_the_rule_file() -> None:
    result = run("check", "rules", RULES)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = run("test", "rules", *RULE_TESTS)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


def test_every_required_alert_exists_with_summary_description_and_runbook() -> None:
    anchors = {
        github_anchor(line.lstrip("#"))
        for line in (ROOT / "docs" / "operations.md").read_text().splitlines()
        if line.startswith("#")
    }
    found = {rule["alert"] for rule in alerts()}
    assert found >= REQUIRED_ALERTS, REQUIRED_ALERTS - found
    for rule in alerts():
        notes = rule["annotations"]
        assert notes["summary"].strip() and notes["description"].strip(), rule["alert"]
        path, _, anchor = notes["runbook_url"].partition("#")
        assert path == "docs/operations.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in docs/operations.md"
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    """Each alert fires in some test, and some test shows it staying quiet: an expectation of
    no alert, or an input series (another instance) absent from the alerts expected."""
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            instances = set(re.findall(r'instance="(\w+)"', str(case["input_series"])))
            for check in case["alert_rule_test"]:
                expected = check.get("exp_alerts") or []
                if not expected:
                    quiet.add(check["alertname"])
                    continue
                fired.add(check["alertname"])
                alerted = {alert["exp_labels"].get("instance") for alert in expected}
                if instances - alerted and None not in alerted:
                    quiet.add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - fired == set(), "alerts never fired by a test"
    assert names - quiet == set(), "alerts never shown quiet by a test"
