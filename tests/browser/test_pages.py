"""The console and the chat page in Chromium, against a real `rom-agent serve`."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.browser.conftest import ADMIN_TOKEN, API_KEY, SCREENSHOTS
from tests.server import ServiceProcess

pytestmark = pytest.mark.browser

STATE_TIMEOUT_MS = 15_000

# Records every state the breaker row of `model` shows, in order, without reloading.
_WATCH_STATES = """
(model) => {
  window.__states = [];
  window.__loadedAt = performance.timeOrigin;
  const row = () => document.getElementById("breaker-" + model);
  const record = () => {
    const state = row() && row().dataset.state;
    if (state && window.__states[window.__states.length - 1] !== state) window.__states.push(state);
  };
  record();
  new MutationObserver(record).observe(document.getElementById("breakers"),
    { subtree: true, attributes: true, attributeFilter: ["data-state"], childList: true });
}
"""


def _admin(service: ServiceProcess) -> httpx.Client:
    return httpx.Client(base_url=service.url, headers={"X-Admin-Token": ADMIN_TOKEN}, timeout=10)


def _chat(service: ServiceProcess, text: str, **headers: str) -> httpx.Response:
    return httpx.post(
        service.url + "/api/chat",
        json={"mensagem": text},
        headers={"Authorization": f"Bearer {API_KEY}", **headers},
        timeout=30,
    )


def _login(browser: Any, service: ServiceProcess) -> Any:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(service.url + "/console")
    page.fill("#token", ADMIN_TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector("#breaker-rom-sim-1 .state[data-state]")
    page.wait_for_selector('#link[data-state="live"]')
    return page


def test_console_login_sets_a_strict_session_cookie_and_keeps_the_token_out_of_the_page(
    browser: Any, service: ServiceProcess
) -> None:
    page = _login(browser, service)
    assert page.url == service.url + "/console"  # no token in the URL
    (cookie,) = page.context.cookies()
    assert cookie["name"] == "__Host-rom_console"
    assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (True, True, "Strict")
    assert ADMIN_TOKEN not in page.content()
    storage = page.evaluate("() => JSON.stringify([{...localStorage}, {...sessionStorage}])")
    assert ADMIN_TOKEN not in storage
    assert page.evaluate("() => document.cookie") == ""  # HttpOnly: invisible to scripts
    page.context.close()


def test_console_shows_breaker_cycle_live_while_force_errors_are_sent(
    browser: Any, service: ServiceProcess
) -> None:
    page = _login(browser, service)
    page.evaluate(_WATCH_STATES, "rom-sim-1")
    only_sim_1 = {"X-Fault": "models=rom-sim-1"}
    for _ in range(2):  # CIRCUIT_BREAKER_THRESHOLD=2; rom-sim-2 answers as the fallback
        assert _chat(service, "FORCE_ERROR", **only_sim_1).json()["fallbackUsed"] is True
    page.wait_for_selector('#breaker-rom-sim-1[data-state="OPEN"]', timeout=STATE_TIMEOUT_MS)
    row = page.locator("#breaker-rom-sim-1")
    assert "2 consecutive failures" in row.locator('[data-field="why"]').inner_text()
    assert row.locator('[data-field="counts"]').inner_text().startswith("2 /")
    page.screenshot(path=str(SCREENSHOTS / "console-breaker-open.png"), full_page=False)

    # The cooldown passes with no traffic: the push alone shows HALF_OPEN.
    page.wait_for_selector('#breaker-rom-sim-1[data-state="HALF_OPEN"]', timeout=STATE_TIMEOUT_MS)
    assert _chat(service, "Olá, tudo certo agora?").json()["modelUsed"] == "rom-sim-1"
    page.wait_for_selector('#breaker-rom-sim-1[data-state="CLOSED"]', timeout=STATE_TIMEOUT_MS)

    assert page.evaluate("() => window.__states") == ["CLOSED", "OPEN", "HALF_OPEN", "CLOSED"]
    assert page.evaluate("() => window.__loadedAt === performance.timeOrigin")  # no reload
    page.context.close()


def test_breaker_action_asks_for_confirmation_and_is_audited(
    browser: Any, service: ServiceProcess
) -> None:
    page = _login(browser, service)
    force_open = page.locator('#breaker-rom-sim-2 button[data-action="open"]')
    page.once("dialog", lambda dialog: dialog.dismiss())
    force_open.click()
    page.wait_for_timeout(300)  # a dismissed dialog must send nothing; give it a chance to
    assert _admin(service).get("/admin/breakers").json()["breakers"][1]["state"] == "CLOSED"

    page.once("dialog", lambda dialog: dialog.accept())
    force_open.click()
    page.wait_for_selector('#breaker-rom-sim-2[data-state="OPEN"]', timeout=STATE_TIMEOUT_MS)
    page.wait_for_selector('#audit tbody tr:has-text("breaker_open rom-sim-2")')
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator('#breaker-rom-sim-2 button[data-action="reset"]').click()
    page.wait_for_selector('#breaker-rom-sim-2[data-state="CLOSED"]', timeout=STATE_TIMEOUT_MS)
    page.context.close()


def test_flag_edit_adds_an_audit_row_and_a_wrong_value_changes_nothing(
    browser: Any, service: ServiceProcess
) -> None:
    page = _login(browser, service)
    row = page.locator("#flag-MAX_QUEUE")
    row.locator("input").fill("7")
    row.locator('button[data-action="save"]').click()
    page.wait_for_selector('#audit tbody tr:has-text("MAX_QUEUE: 20 → 7")')
    assert row.locator('[data-field="source"]').inner_text() == "override"
    assert _admin(service).get("/admin/flags").json()["flags"]["MAX_QUEUE"] == 7

    audit_rows = page.locator("#audit tbody tr").count()
    row.locator("input").fill("-3")
    row.locator('button[data-action="save"]').click()
    error = row.locator('[data-field="error"]')
    error.wait_for(state="visible")
    assert "MAX_QUEUE" in error.inner_text()
    assert _admin(service).get("/admin/flags").json()["flags"]["MAX_QUEUE"] == 7
    page.wait_for_timeout(300)  # no audit row may appear for the refused change
    assert page.locator("#audit tbody tr").count() == audit_rows
    page.context.close()


def test_switching_fault_injection_on_needs_a_confirmation(
    browser: Any, service: ServiceProcess
) -> None:
    page = _login(browser, service)
    admin = _admin(service)
    admin.patch("/admin/flags", json={"ENABLE_FAULT_INJECTION": False})
    row = page.locator("#flag-ENABLE_FAULT_INJECTION")
    page.wait_for_function(
        "() => document.querySelector('#flag-ENABLE_FAULT_INJECTION input').value === 'false'"
    )
    row.locator("input").fill("true")
    page.once("dialog", lambda dialog: dialog.dismiss())
    row.locator('button[data-action="save"]').click()
    page.wait_for_timeout(300)
    assert admin.get("/admin/flags").json()["flags"]["ENABLE_FAULT_INJECTION"] is False

    page.once("dialog", lambda dialog: dialog.accept())
    row.locator('button[data-action="save"]').click()
    page.wait_for_selector('#audit tbody tr:has-text("ENABLE_FAULT_INJECTION: false → true")')
    assert admin.get("/admin/flags").json()["flags"]["ENABLE_FAULT_INJECTION"] is True
    page.context.close()


def test_chat_streams_survives_reload_and_renders_model_html_as_text(
    browser: Any, service: ServiceProcess
) -> None:
    context = browser.new_context(viewport={"width": 1100, "height": 750})
    page = context.new_page()
    page.goto(service.url + "/")
    question = "<script>window.__pwned = 1</script> <b>x</b> Qual o prazo para contestar?"
    page.fill("#message", question)
    page.keyboard.press("Enter")
    # API_KEYS is set: the page asks for the key once.
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#api-key", API_KEY)
    page.keyboard.press("Enter")

    answer = page.locator(".msg.assistant").last
    page.wait_for_selector(".msg.assistant.streaming .body p")
    lengths: list[int] = []
    while "streaming" in (answer.get_attribute("class") or "") and len(lengths) < 400:
        lengths.append(len(answer.locator(".body").inner_text()))
        if len(set(lengths)) == 15:  # about a third of the answer
            page.screenshot(path=str(SCREENSHOTS / "chat-mid-stream.png"))
        page.wait_for_timeout(50)
    grown = sorted(set(lengths))
    assert len(grown) >= 3, f"the answer did not grow while streaming: {lengths}"
    assert lengths == sorted(lengths)

    page.wait_for_selector(".msg.assistant:not(.streaming) .meta:has-text('rom-sim-1')")
    text = answer.locator(".body").inner_text()
    assert "<script>window.__pwned = 1</script>" in text  # shown as text...
    assert page.evaluate("() => window.__pwned") is None  # ...never run
    assert page.locator("#messages script, #messages b").count() == 0

    page.reload()
    page.wait_for_selector("#conversations .conversation.current")
    assert page.locator("#conversations li").count() == 1
    page.wait_for_selector(".msg.assistant .body:has-text('Recebi a sua mensagem')")
    assert page.locator(".msg.user").first.inner_text().startswith("<script>")
    assert page.locator("#key-dialog[open]").count() == 0  # asked once per tab
    context.close()


def test_chat_shows_a_readable_error_when_every_model_is_open(
    browser: Any, service: ServiceProcess
) -> None:
    admin = _admin(service)
    for model in ("rom-sim-1", "rom-sim-2"):
        admin.post(f"/admin/breakers/{model}/open").raise_for_status()
    try:
        context = browser.new_context(viewport={"width": 390, "height": 800})  # a phone
        page = context.new_page()
        page.goto(service.url + "/chat")
        page.evaluate("(key) => sessionStorage.setItem('rom.apiKey', key)", API_KEY)
        page.fill("#message", "Olá?")
        page.click("#send")
        error = page.locator(".msg.assistant.failed .error")
        error.wait_for()
        assert error.inner_text().startswith("Não foi possível responder:")
        assert "Tente novamente" in error.inner_text()
        assert page.locator(".msg.assistant.failed .meta").inner_text() == "CIRCUIT_OPEN"
        assert page.locator("#sidebar").is_hidden()  # phone layout: the list is behind ☰
        page.click("#toggle-sidebar")
        assert page.locator("#sidebar").is_visible()
        context.close()
    finally:
        for model in ("rom-sim-1", "rom-sim-2"):
            admin.post(f"/admin/breakers/{model}/reset").raise_for_status()


def test_rollout_started_from_the_page_shows_each_check_as_it_runs(
    browser: Any, fresh_service: ServiceProcess
) -> None:
    page = _login(browser, fresh_service)
    page.fill("#rollout-key", API_KEY)
    page.fill("#rollout-delay", "500")  # stage C's burst: 5 waves of 0.5 s instead of 3 s
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#rollout-start")
    # A check is on the page while the rollout is still running: pushed as it happens.
    page.wait_for_selector("#rollout-events li.check", timeout=STATE_TIMEOUT_MS)
    assert page.locator("#rollout-status").get_attribute("data-status") == "running"
    page.wait_for_selector(
        '#rollout-status[data-status="GO"], #rollout-status[data-status="NO-GO"]', timeout=60_000
    )
    events = page.locator("#rollout-events")
    assert page.locator("#rollout-status").inner_text() == "GO", events.inner_text()
    assert events.locator('.outcome[data-outcome="FAIL"]').count() == 0
    assert events.locator('.outcome[data-outcome="PASS"]').count() > 20
    for stage in ("Stage A", "Stage B", "Stage C"):
        assert events.locator(f"li.stage:has-text('{stage}: PASSED')").count() == 1
    page.wait_for_selector("#rollout-report:not([hidden])")
    report = page.evaluate("() => fetch('/console/rollout/report').then((r) => r.text())")
    assert "**Verdict: GO**" in report
    page.screenshot(path=str(SCREENSHOTS / "console-rollout-go.png"), full_page=True)
    page.context.close()


def test_pages_send_a_strict_csp_and_hashed_static_files(service: ServiceProcess) -> None:
    for path in ("/", "/chat", "/console"):
        response = httpx.get(service.url + path)
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "<script>" not in response.text  # every script is a file
    page = httpx.get(service.url + "/chat").text
    static = [part.split('"')[0] for part in page.split('="/static/')[1:]]
    assert len(static) == 3
    for name in static:
        response = httpx.get(service.url + "/static/" + name)
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
