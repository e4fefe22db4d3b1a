"""The admin API over real HTTP: auth, runtime flags, audit, restart, breakers, bottleneck."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from rom_agent.app import create_services
from rom_agent.config import Settings
from rom_agent.flag_changes import RUNTIME_KEYS, STATIC_KEYS
from rom_agent.http import admin
from rom_agent.services import Services
from tests.server import RunningApp, isolated_settings, running_app

# Generated per run: no token value is ever written into the repository.
TOKEN = secrets.token_urlsafe(32)
AUTH = {"X-Admin-Token": TOKEN}


class FakeBreakers:
    """Stands in for BreakerRegistry: fixed states, records manual actions."""

    def __init__(self, models: list[str]) -> None:
        self._states = dict.fromkeys(models, "CLOSED")
        self.actions: list[tuple[str, str]] = []

    def states(self) -> Iterator[tuple[str, str]]:
        yield from self._states.items()

    def snapshot(self) -> dict[str, Any]:
        breakers = [{"model": m, "state": s} for m, s in self._states.items()]
        return {"enabled": True, "breakers": breakers}

    def force_open(self, model: str) -> None:
        self.actions.append(("open", model))
        self._states[model] = "OPEN"

    def force_close(self, model: str) -> None:
        self.actions.append(("close", model))
        self._states[model] = "CLOSED"

    def reset(self, model: str) -> None:
        self.actions.append(("reset", model))
        self._states[model] = "CLOSED"


class FakeBottleneck:
    """Stands in for Bottleneck; admission must never be asked for an admin route."""

    running, queued, draining = 5, 20, False

    def snapshot(self) -> dict[str, Any]:
        return {"enabled": True, "running": 5, "queued": 20, "maxConcurrent": 5, "maxQueue": 20}

    async def acquire(self) -> None:
        raise AssertionError("admin routes must not go through admission control")

    def start_draining(self) -> None:
        self.draining = True


def admin_services(settings: Settings) -> Services:
    services = create_services(settings)
    services.breakers = FakeBreakers([ref.id for ref in services.chain])  # type: ignore[assignment]
    services.bottleneck = FakeBottleneck()  # type: ignore[assignment]
    return services


@contextlib.contextmanager
def admin_server(settings: Settings, services: Services | None = None) -> Iterator[RunningApp]:
    services = services or admin_services(settings)
    with running_app(settings, services) as running:
        yield running


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningApp]:
    with admin_server(isolated_settings(tmp_path, admin_token=TOKEN)) as running:
        yield running


@pytest.fixture
def client(server: RunningApp) -> Iterator[httpx.Client]:
    with server.client(headers=AUTH) as http:
        yield http


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "status", "code"}
    assert (body["status"], body["code"]) == (status, code)
    return body


EVERY_ROUTE = [
    ("GET", "/admin/flags", None),
    ("PATCH", "/admin/flags", {"MAX_QUEUE": 20}),
    ("DELETE", "/admin/flags/MAX_QUEUE", None),
    ("GET", "/admin/flags/history", None),
    ("GET", "/admin/breakers", None),
    ("POST", "/admin/breakers/rom-sim-1/open", None),
    ("GET", "/admin/bottleneck", None),
]


# ---------------------------------------------------------------------- authentication


def test_without_admin_token_every_route_is_disabled(tmp_path: Path) -> None:
    with admin_server(isolated_settings(tmp_path)) as running, running.client() as http:
        for method, path, body in EVERY_ROUTE:
            response = http.request(method, path, json=body, headers=AUTH)
            assert_error(response, 503, "ADMIN_DISABLED")
        assert running.services.flags.overrides == {}


def test_missing_and_wrong_tokens_get_the_same_401(server: RunningApp) -> None:
    with server.client() as http:
        for method, path, body in EVERY_ROUTE:
            missing = http.request(method, path, json=body)
            wrong = http.request(method, path, json=body, headers={"X-Admin-Token": TOKEN[:-1]})
            longer = http.request(method, path, json=body, headers={"X-Admin-Token": TOKEN + "x"})
            assert_error(missing, 401, "UNAUTHORIZED")
            assert missing.content == wrong.content == longer.content
        assert server.services.flags.overrides == {}
        assert server.services.breakers.actions == []  # type: ignore[attr-defined]


def test_the_right_token_is_accepted(client: httpx.Client) -> None:
    assert client.get("/admin/flags").status_code == 200


def test_the_token_is_never_logged_nor_echoed(
    server: RunningApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs, server.client() as http:
        answers = [
            http.get("/admin/flags", headers={"X-Admin-Token": TOKEN[::-1]}),
            http.get("/admin/flags", headers=AUTH),
            http.patch("/admin/flags", json={"MAX_QUEUE": 21}, headers=AUTH),
            http.patch("/admin/flags", json={"ADMIN_TOKEN": TOKEN}, headers=AUTH),
            http.get("/admin/flags/history", headers=AUTH),
        ]
    assert [a.status_code for a in answers] == [401, 200, 200, 400, 200]
    assert any(e["event"] == "admin authentication failed" for e in logs)  # logs were captured
    everything = repr(logs) + caplog.text + "".join(a.text + repr(a.headers) for a in answers)
    assert TOKEN not in everything and TOKEN[::-1] not in everything


def test_startup_warns_about_a_short_token(tmp_path: Path) -> None:
    def logged(**settings: Any) -> list[tuple[str, str]]:
        with structlog.testing.capture_logs() as logs:
            admin.warn_about_admin_token(isolated_settings(tmp_path, **settings))
        return [(e["log_level"], e["event"]) for e in logs]

    short = secrets.token_hex(8)
    (warning,) = logged(admin_token=short)
    assert warning[0] == "warning" and "shorter than 32" in warning[1]
    assert short not in warning[1]
    assert logged(admin_token=TOKEN) == []
    assert logged() == [("info", "admin API disabled: ADMIN_TOKEN is not set")]


# ---------------------------------------------------------------------- GET /admin/flags


def test_flags_show_every_key_typed_with_sources_and_no_secrets(client: httpx.Client) -> None:
    body = client.get("/admin/flags").json()
    flags = body["flags"]
    assert set(flags) == {key.upper() for key in (*RUNTIME_KEYS, *STATIC_KEYS)}
    assert set(body["sources"]) == set(flags)
    assert flags["ENABLE_CIRCUIT_BREAKER"] is False and flags["ENABLE_RETRY"] is True
    assert flags["MAX_CONCURRENT"] == 5 and flags["MAX_QUEUE"] == 20
    assert flags["RETRY_BUDGET_RATIO"] == 0.2 and flags["GUARDRAIL_MODE"] == "off"
    assert flags["MODEL_CHAIN"] == ["simulator/rom-sim-1", "simulator/rom-sim-2"]
    assert not {"ADMIN_TOKEN", "API_KEYS", "OPENAI_API_KEY"} & set(flags)
    assert body["secrets"] == {"ADMIN_TOKEN": True, "API_KEYS": False, "OPENAI_API_KEY": False}
    assert body["sources"]["MAX_QUEUE"] == "default"
    assert body["updatedAt"].endswith("Z")


# ---------------------------------------------------------------------- PATCH / DELETE


def test_the_guide_stages_through_the_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The guide's starting point: inconsistent limits in the environment.
    monkeypatch.setenv("MAX_CONCURRENT", "6")
    monkeypatch.setenv("MAX_QUEUE", "10")
    settings = isolated_settings(tmp_path, admin_token=TOKEN)
    with admin_server(settings) as running, running.client(headers=AUTH) as http:
        before = http.get("/admin/flags").json()
        assert (before["flags"]["MAX_CONCURRENT"], before["sources"]["MAX_CONCURRENT"]) == (
            6,
            "env",
        )

        # Stage A: align the bottleneck parameters (string values, as typed by an operator).
        stage_a = http.patch("/admin/flags", json={"MAX_CONCURRENT": "5", "MAX_QUEUE": "20"})
        assert stage_a.status_code == 200, stage_a.text
        assert stage_a.json()["changed"] == {
            "MAX_CONCURRENT": {"old": 6, "new": 5},
            "MAX_QUEUE": {"old": 10, "new": 20},
        }
        flags = http.get("/admin/flags").json()["flags"]
        assert (flags["MAX_CONCURRENT"], flags["MAX_QUEUE"]) == (5, 20)
        assert flags["ENABLE_CIRCUIT_BREAKER"] is False and flags["ENABLE_BOTTLENECK"] is False

        # Stage B, lower-case keys and the {"flags": {...}} shape; applied at once.
        http.patch("/admin/flags", json={"flags": {"enable_circuit_breaker": True}})
        assert running.services.flags.current.enable_circuit_breaker is True
        assert http.get("/admin/flags").json()["flags"]["ENABLE_CIRCUIT_BREAKER"] is True

        # Rollback: drop the override, back to the environment's value.
        rollback = http.delete("/admin/flags/ENABLE_CIRCUIT_BREAKER")
        assert rollback.status_code == 200
        assert rollback.json()["changed"] == {"ENABLE_CIRCUIT_BREAKER": {"old": True, "new": False}}
        assert rollback.json()["sources"]["ENABLE_CIRCUIT_BREAKER"] == "default"
        assert running.services.flags.current.enable_circuit_breaker is False


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"ENABLE_BOTTLENECK": True, "MAX_QUEUE": -5}, "MAX_QUEUE"),
        ({"ENABLE_BOTTLENECK": True, "MAX_QUEUE": True}, "MAX_QUEUE"),
        ({"ENABLE_BOTTLENECK": True, "MODEL_CHAIN": "simulator/x"}, "MODEL_CHAIN"),
        ({"ENABLE_BOTTLENECK": True, "WHATEVER": 1}, "WHATEVER"),
        ({"ENABLE_BOTTLENECK": "maybe"}, "ENABLE_BOTTLENECK"),
        ({}, "no flags"),
        ([1, 2], "JSON object"),
    ],
)
def test_an_invalid_change_is_a_400_naming_the_key_and_applies_nothing(
    client: httpx.Client, server: RunningApp, body: Any, named: str
) -> None:
    before = client.get("/admin/flags").json()
    response = client.patch("/admin/flags", json=body)
    assert named in assert_error(response, 400, "INVALID_REQUEST")["error"]
    assert client.get("/admin/flags").json() == before
    assert server.services.flags.current.enable_bottleneck is False
    assert client.get("/admin/flags/history").json() == {"entries": []}


def test_a_body_that_is_not_json_is_a_400(client: httpx.Client) -> None:
    response = client.patch("/admin/flags", content=b"MAX_QUEUE=20")
    assert_error(response, 400, "INVALID_REQUEST")


def test_deleting_a_key_without_override_is_a_404(client: httpx.Client) -> None:
    assert_error(client.delete("/admin/flags/MAX_QUEUE"), 404, "NOT_FOUND")
    assert_error(client.delete("/admin/flags/NOT_A_FLAG"), 404, "NOT_FOUND")


# ---------------------------------------------------------------------- history and restart


def test_history_is_newest_first_with_client_and_old_to_new(client: httpx.Client) -> None:
    client.patch("/admin/flags", json={"MAX_QUEUE": 30})
    client.patch("/admin/flags", json={"MAX_QUEUE": 40})
    client.delete("/admin/flags/max_queue")

    entries = client.get("/admin/flags/history").json()["entries"]
    assert [(e["action"], e["changes"]["MAX_QUEUE"]) for e in entries] == [
        ("unset", {"old": 40, "new": 20}),
        ("set", {"old": 30, "new": 40}),
        ("set", {"old": 20, "new": 30}),
    ]
    assert {e["client"] for e in entries} == {"127.0.0.1"}
    assert all(e["time"].endswith("Z") for e in entries)
    limited = client.get("/admin/flags/history", params={"limit": 1}).json()["entries"]
    assert limited == entries[:1]
    for bad in ("0", "-1", "abc", "100000"):
        response = client.get("/admin/flags/history", params={"limit": bad})
        assert_error(response, 400, "INVALID_REQUEST")


def test_overrides_and_history_survive_a_restart(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, admin_token=TOKEN)
    with admin_server(settings) as first, first.client(headers=AUTH) as http:
        assert http.patch("/admin/flags", json={"ENABLE_BOTTLENECK": True}).status_code == 200

    with admin_server(settings) as second, second.client(headers=AUTH) as http:
        body = http.get("/admin/flags").json()
        assert body["flags"]["ENABLE_BOTTLENECK"] is True
        assert body["sources"]["ENABLE_BOTTLENECK"] == "runtime"
        assert second.services.flags.current.enable_bottleneck is True
        (entry,) = http.get("/admin/flags/history").json()["entries"]
        assert entry["changes"] == {"ENABLE_BOTTLENECK": {"old": False, "new": True}}


# ---------------------------------------------------------------------- breakers, bottleneck


def test_breakers_are_listed_and_controlled_by_model_id(
    client: httpx.Client, server: RunningApp
) -> None:
    assert client.get("/admin/breakers").json()["breakers"][0] == {
        "model": "rom-sim-1",
        "state": "CLOSED",
        "override": None,  # fleet mode only (REDIS_URL)
        "hint": None,
    }
    opened = client.post("/admin/breakers/rom-sim-1/open")
    assert opened.status_code == 200
    assert opened.json() == {
        "model": "rom-sim-1",
        "action": "open",
        "previousState": "CLOSED",
        "state": "OPEN",
        "enabled": False,
        "override": None,  # shared only in fleet mode
        "replica": server.services.fleet.replica_id,
    }
    client.post("/admin/breakers/rom-sim-1/close")
    client.post("/admin/breakers/rom-sim-2/reset")
    fake = server.services.breakers
    assert fake.actions == [  # type: ignore[attr-defined]
        ("open", "rom-sim-1"),
        ("close", "rom-sim-1"),
        ("reset", "rom-sim-2"),
    ]
    first = client.get("/admin/flags/history").json()["entries"][-1]  # newest first
    assert first["action"] == "breaker_open" and first["target"] == "rom-sim-1"
    assert first["changes"] == {"state": {"old": "CLOSED", "new": "OPEN"}}
    assert first["client"] == "127.0.0.1"


@pytest.mark.parametrize(
    "path",
    [
        "/admin/breakers/unknown-model/open",
        "/admin/breakers/simulator%2From-sim-1/open",  # ids are without the provider prefix
        "/admin/breakers/rom-sim-1/explode",
    ],
)
def test_unknown_breaker_models_and_actions_are_404(
    client: httpx.Client, server: RunningApp, path: str
) -> None:
    assert_error(client.post(path), 404, "NOT_FOUND")
    assert server.services.breakers.actions == []  # type: ignore[attr-defined]


def test_bottleneck_snapshot_is_served_without_admission(client: httpx.Client) -> None:
    # The fake reports a full queue and fails any admission: admin routes must still answer.
    response = client.get("/admin/bottleneck")
    assert response.status_code == 200
    assert response.json()["queued"] == 20
    assert client.get("/admin/flags").status_code == 200
