"""render.yaml describes a fleet: two instances wired to one PostgreSQL and one Key Value, and
every variable it sets is one the service knows (a typo would silently do nothing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rom_agent.config import Settings

BLUEPRINT = Path(__file__).resolve().parents[1] / "render.yaml"
PLATFORM_KEYS = {"PYTHON_VERSION", "FORWARDED_ALLOW_IPS"}  # read by Render / uvicorn


def blueprint() -> dict[str, Any]:
    return dict(yaml.safe_load(BLUEPRINT.read_text()))


def test_the_web_service_is_a_fleet_wired_to_postgresql_and_key_value() -> None:
    spec = blueprint()
    (web,) = [s for s in spec["services"] if s["type"] == "web"]
    keyvalues = {s["name"] for s in spec["services"] if s["type"] == "keyvalue"}
    databases = {d["name"] for d in spec["databases"]}
    env = {e["key"]: e for e in web["envVars"]}
    assert web["numInstances"] >= 2
    assert "disk" not in web  # a disk pins Render to one instance
    assert env["DATABASE_URL"]["fromDatabase"]["name"] in databases
    assert env["DATABASE_URL"]["fromDatabase"]["property"] == "connectionString"
    redis = env["REDIS_URL"]["fromService"]
    assert redis["type"] == "keyvalue" and redis["name"] in keyvalues
    assert env["ADMISSION_SCOPE"]["value"] == "fleet"
    assert web["preDeployCommand"] == "rom-agent migrate"


def test_every_variable_is_a_setting_of_the_service() -> None:
    (web,) = [s for s in blueprint()["services"] if s["type"] == "web"]
    known = {name.upper() for name in Settings.model_fields} | PLATFORM_KEYS
    assert {e["key"] for e in web["envVars"]} <= known
