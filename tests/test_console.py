"""The console's HTTP side: off without ADMIN_TOKEN, session cookie, CSRF, CSP, static files,
page weight, the live-state windows and the rollout output parser. The browser tests
(tests/browser) drive the same pages in Chromium."""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from rom_agent.http.web.assets import ASSETS, CONTENT_SECURITY_POLICY
from rom_agent.http.web.live import CounterWindow
from rom_agent.http.web.rollout_runner import RolloutRun
from rom_agent.http.web.session import COOKIE, SESSION_TTL_S, new_cookie_value, parse_session
from tests.server import RunningApp, isolated_settings, running_app

TOKEN = "console-test-token-0123456789abcdef0123"
PAGE_BUDGET_BYTES = 100 * 1024


@pytest.fixture
def app(tmp_path: Path) -> Iterator[RunningApp]:
    settings = isolated_settings(
        tmp_path, admin_token=TOKEN, api_keys="k-123", cors_origins="https://other.example"
    )
    with running_app(settings) as running:
        yield running


def _login(app: RunningApp) -> tuple[httpx.Client, str]:
    """A logged-in client (cookie jar) and the page's CSRF token."""
    http = app.client()
    response = http.post("/console/session", data={"token": TOKEN}, headers={"Origin": app.url})
    assert response.status_code == 303
    # httpx does not send Secure cookies over http://; a browser does for 127.0.0.1.
    http.cookies.set(COOKIE, response.cookies[COOKIE])
    page = http.get("/console").text
    match = re.search(r'name="csrf-token" content="([0-9a-f]{64})"', page)
    assert match is not None
    return http, match[1]


def test_console_is_off_without_admin_token(tmp_path: Path) -> None:
    with running_app(isolated_settings(tmp_path)) as app, app.client() as http:
        for method, path in [
            ("GET", "/console"),
            ("GET", "/console/events"),
            ("POST", "/console/session"),
            ("PATCH", "/console/api/flags"),
        ]:
            response = http.request(method, path, headers={"Origin": app.url})
            assert response.status_code == 503
            assert response.json()["code"] == "ADMIN_DISABLED"
        assert http.get("/chat").status_code == 200  # the chat page needs no admin token


def test_login_sets_a_strict_host_only_session_cookie(app: RunningApp) -> None:
    with app.client() as http:
        assert "Admin token" in http.get("/console").text
        response = http.post("/console/session", data={"token": TOKEN}, headers={"Origin": app.url})
    assert response.status_code == 303 and response.headers["location"] == "/console"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(COOKIE + "=")
    for attribute in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"):
        assert attribute.lower() in cookie.lower()
    assert "max-age" not in cookie.lower() and "domain" not in cookie.lower()
    assert TOKEN not in cookie


def test_wrong_token_and_cross_site_login_are_refused(app: RunningApp) -> None:
    with app.client() as http:
        wrong = http.post("/console/session", data={"token": "nope"}, headers={"Origin": app.url})
        assert wrong.status_code == 401 and "Wrong admin token" in wrong.text
        assert "set-cookie" not in wrong.headers
        cross = http.post(
            "/console/session", data={"token": TOKEN}, headers={"Origin": "https://evil.example"}
        )
        assert cross.status_code == 403 and cross.json()["code"] == "CSRF_FAILED"
        # CORS_ORIGINS lists an origin for the API; it gains nothing on the console.
        allowed = http.post(
            "/console/session", data={"token": TOKEN}, headers={"Origin": "https://other.example"}
        )
        assert allowed.status_code == 403


def test_every_console_endpoint_needs_the_session(app: RunningApp) -> None:
    with app.client() as http:
        assert http.get("/console/api/flags").status_code == 401
        assert http.get("/console/events").status_code == 401
        assert http.get("/console/rollout/report").status_code == 401
        forged = new_cookie_value("another-token-0123456789abcdef0123456")
        http.cookies.set(COOKIE, forged)
        assert http.get("/console/api/flags").status_code == 401


def test_mutations_need_the_csrf_token_and_the_same_origin(app: RunningApp) -> None:
    http, csrf = _login(app)
    with contextlib.closing(http):
        change = {"MAX_QUEUE": 9}
        no_token = http.patch("/console/api/flags", json=change, headers={"Origin": app.url})
        cross = http.patch(
            "/console/api/flags",
            json=change,
            headers={"Origin": "https://evil.example", "X-CSRF-Token": csrf},
        )
        wrong = http.patch(
            "/console/api/flags", json=change, headers={"Origin": app.url, "X-CSRF-Token": "0" * 64}
        )
        for response in (no_token, cross, wrong):
            assert response.status_code == 403 and response.json()["code"] == "CSRF_FAILED"
        assert app.services.flags.current.max_queue == 20

        ok = http.patch(
            "/console/api/flags", json=change, headers={"Origin": app.url, "X-CSRF-Token": csrf}
        )
        assert ok.status_code == 200 and ok.json()["changed"]["MAX_QUEUE"] == {"old": 20, "new": 9}
        assert app.services.flags.current.max_queue == 9
        history = http.get("/console/api/flags").json()["history"]
        assert history[0]["changes"] == {"MAX_QUEUE": {"old": 20, "new": 9}}
        assert history[0]["client"] == "127.0.0.1"

        bad = http.patch(
            "/console/api/flags",
            json={"MAX_QUEUE": "lots"},
            headers={"Origin": app.url, "X-CSRF-Token": csrf},
        )
        assert bad.status_code == 400 and "MAX_QUEUE" in bad.json()["error"]
        assert app.services.flags.current.max_queue == 9

        # With ENABLE_CIRCUIT_BREAKER off a breaker stays CLOSED (SPEC §4), even when opened.
        app.services.flags.set({"enable_circuit_breaker": True})
        action = http.post(
            "/console/api/breakers/rom-sim-1/open",
            headers={"Origin": app.url, "X-CSRF-Token": csrf},
        )
        assert action.status_code == 200 and action.json()["state"] == "OPEN"


def test_events_stream_pushes_the_live_state(app: RunningApp) -> None:
    http, _ = _login(app)
    app.services.flags.set({"enable_circuit_breaker": True})  # off: breakers stay CLOSED
    app.services.breakers.force_open("rom-sim-2")
    with contextlib.closing(http), http.stream("GET", "/console/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        state = orjson.loads(next(lines)[6:])
    models = {m["model"]: m for m in state["models"]}
    assert models["rom-sim-2"]["state"] == "OPEN" and models["rom-sim-2"]["forced"] is True
    assert models["rom-sim-2"]["why"] == "forced open"
    assert models["rom-sim-1"]["state"] == "CLOSED"
    assert state["admission"]["limit"] == 5 and state["admission"]["queueLimit"] == 20
    assert state["process"]["draining"] is False and state["fleet"] is None


def test_pages_have_a_strict_csp_and_no_inline_script(app: RunningApp) -> None:
    with app.client() as http:
        for path in ("/", "/chat", "/console"):
            response = http.get(path)
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert response.headers["cache-control"] == "no-store"
            assert response.headers["x-frame-options"] == "DENY"
            assert not re.search(r"<script(?![^>]*\bsrc=)", response.text)
            assert " style=" not in response.text and "on" + "click=" not in response.text
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
    assert "http" not in CONTENT_SECURITY_POLICY  # no third-party origin


def test_static_files_are_named_by_content_hash_and_cached_for_good(app: RunningApp) -> None:
    with app.client() as http:
        for asset in ASSETS.values():
            response = http.get(asset.url)
            assert response.status_code == 200
            assert response.content == asset.body
            assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
            assert hashlib.sha256(response.content).hexdigest()[:12] in asset.url
            again = http.get(asset.url, headers={"If-None-Match": response.headers["etag"]})
            assert again.status_code == 304
        missing = http.get("/static/console.000000000000.js")
        assert missing.status_code == 404 and missing.json()["code"] == "NOT_FOUND"


@pytest.mark.parametrize("path", ["/chat", "/console"])
def test_first_load_weighs_under_100_kb(app: RunningApp, path: str) -> None:
    http, _ = _login(app)
    with contextlib.closing(http):
        page = http.get(path)
        total = len(page.content)
        for url in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
            total += len(http.get(url).content)
    assert total < PAGE_BUDGET_BYTES, f"{path} weighs {total} bytes"


def test_session_cookie_expires_and_rejects_tampering() -> None:
    value = new_cookie_value(TOKEN, now=1000.0)
    assert parse_session(value, TOKEN, now=1000.0 + SESSION_TTL_S - 1) is not None
    assert parse_session(value, TOKEN, now=1000.0 + SESSION_TTL_S + 1) is None
    assert parse_session(value, "a-new-admin-token-after-rotation-000", now=1000.0) is None
    expiry, nonce, mac = value.split(".")
    assert parse_session(f"{int(expiry) + 9999}.{nonce}.{mac}", TOKEN, now=1000.0) is None
    assert parse_session("garbage", TOKEN) is None
    one, two = (parse_session(new_cookie_value(TOKEN), TOKEN) for _ in range(2))
    assert one is not None and two is not None and one.csrf != two.csrf


def test_counter_window_sums_increases_over_the_last_minute_across_resets() -> None:
    window = CounterWindow()
    for second, value in [(0, 0), (10, 4), (20, 6), (30, 1), (40, 3)]:  # reset at 30 s
        window.add(float(second), float(value))
    assert window.increase(40.0) == 4 + 2 + 1 + 2
    assert window.increase(40.0, window_s=10) == 2  # only 30 s → 40 s
    assert window.increase(95.0) == 0  # only the sample at 40 s is left in the window
    assert window.increase(200.0) == 0


def test_rollout_output_becomes_live_events() -> None:
    run = RolloutRun(started_at=0.0)
    for line in [
        "=== Stage B: Circuit breaker",
        "\n== Preflight",
        "[PASS] preflight /health answers: 200",
        "   -> MAX_CONCURRENT: 5 -> 5 (stage A)",
        "[FAIL] B breaker opens",
        "       observed: CLOSED",
        "       expected: OPEN",
        "[SKIP] C burst: stage B failed",
        "",
        "NO-GO: report written to /tmp/x.md",
    ]:
        run.feed(line)
    kinds = [(event["kind"], event.get("outcome")) for event in run.events]
    assert kinds == [
        ("stage", None),
        ("section", None),
        ("check", "PASS"),
        ("action", None),
        ("check", "FAIL"),
        ("check", "SKIP"),
        ("verdict", None),
    ]
    assert run.events[0]["text"] == "Stage B: Circuit breaker"
    assert run.events[4]["text"] == "B breaker opens — observed: CLOSED — expected: OPEN"
    assert run.status == "NO-GO"


async def test_fleet_panel_shows_the_fleet_snapshot_only_in_fleet_mode(tmp_path: Path) -> None:
    from rom_agent.app import create_services
    from rom_agent.http.web.live import LiveState

    services = create_services(isolated_settings(tmp_path))
    live = LiveState(services)
    assert (await live.snapshot())["fleet"] is None  # no REDIS_URL: one process

    class FakeFleet:
        configured = True

        async def snapshot(self) -> dict[str, object]:
            return {"replica": "a", "replicas": [{"id": "a"}, {"id": "b"}]}

    services.fleet = FakeFleet()  # type: ignore[assignment]
    fleet = (await live.snapshot())["fleet"]
    assert [replica["id"] for replica in fleet["replicas"]] == ["a", "b"]


def test_a_cli_rollout_is_watched_through_its_feed(app: RunningApp) -> None:
    from rom_agent.ops.client import AdminClient
    from rom_agent.ops.rollout_feed import ServiceFeed

    out = io.StringIO()
    feed = ServiceFeed(out, AdminClient(app.url, TOKEN), run_id="cli-run-1")
    print("=== Stage A: Align the bottleneck parameters", file=feed, flush=True)
    feed.write("[PASS] A4 MAX_CONCURRENT is 5: 5\n[FAIL] B breaker opens\n")
    feed.write("\nNO-GO: report written to ./STAGING_VALIDATION_REPORT.md\n")
    feed.report("# Staging validation report\n**Verdict: NO-GO**\n")
    assert feed.enabled
    assert out.getvalue().startswith("=== Stage A")  # the terminal still gets every line

    http, _ = _login(app)
    with contextlib.closing(http):
        with http.stream("GET", "/console/events") as response:
            line = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert "Verdict: NO-GO" in http.get("/console/rollout/report").text
    rollout = orjson.loads(line[6:])["rollout"]
    assert (rollout["source"], rollout["status"]) == ("cli", "NO-GO")
    assert rollout["client"] == "127.0.0.1"
    assert [e["kind"] for e in rollout["events"]] == ["stage", "check", "check", "verdict"]
    assert rollout["reportUrl"] == "/console/rollout/report"


def test_the_feed_needs_the_admin_token_and_switches_off_quietly(app: RunningApp) -> None:
    from rom_agent.ops.client import AdminClient
    from rom_agent.ops.rollout_feed import ServiceFeed

    with app.client() as http:
        body = {"run": "x", "lines": ["[PASS] a: b"]}
        assert http.post("/admin/rollout/lines", json=body).status_code == 401
    out = io.StringIO()
    feed = ServiceFeed(out, AdminClient(app.url, "wrong-token-000000000000000000000"), "r")
    feed.write("== Preflight\n")
    feed.report("report")
    assert not feed.enabled and out.getvalue() == "== Preflight\n"
    http, _ = _login(app)
    with contextlib.closing(http), http.stream("GET", "/console/events") as response:
        line = next(line for line in response.iter_lines() if line.startswith("data: "))
    assert orjson.loads(line[6:])["rollout"] is None  # nothing reached the console


async def test_fallbacks_and_retries_per_minute_come_from_events_even_with_metrics_off(
    tmp_path: Path,
) -> None:
    from rom_agent.app import create_services
    from rom_agent.domain.events import FallbackMoved, RetryBudgetExhausted, RetryScheduled
    from rom_agent.http.web.live import LiveState
    from rom_agent.resilience.clock import FakeClock

    clock = FakeClock()
    services = create_services(isolated_settings(tmp_path, enable_metrics=False), clock=clock)
    live = LiveState(services)
    await live.snapshot()  # the base sample
    services.events.emit(FallbackMoved, "rom-sim-1", "rom-sim-2", "error")
    services.events.emit(RetryScheduled, "rom-sim-1", "status_503", 0.5)
    services.events.emit(RetryBudgetExhausted, "rom-sim-1")
    clock.advance(1)
    state = await live.snapshot()
    assert state["fallbacksLastMinute"] == 1
    assert state["retry"]["retriesLastMinute"] == 1
    assert state["retry"]["refusedByBudgetLastMinute"] == 1
    clock.advance(61)
    state = await live.snapshot()
    assert state["fallbacksLastMinute"] == 0  # the minute has passed
