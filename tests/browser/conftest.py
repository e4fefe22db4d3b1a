"""Real pages in a real browser: Debian's Chromium driven by Playwright (no downloaded
browser), against a real `rom-agent serve` process.

One service for the whole module, configured as production would be with every protection on:
`ADMIN_TOKEN`, `API_KEYS`, `CORS_ORIGINS`, the breaker on with a short cooldown, fault
injection on for the FORCE_ERROR drill, and the simulator streaming slowly enough for the DOM
to be seen growing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import ServiceProcess

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ADMIN_TOKEN = "browser-test-admin-token-0123456789abcdef"
API_KEY = "browser-test-api-key-0123456789"
COOLDOWN_S = 2
# Created by the run, never committed (.gitignore): what the browser saw.
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"


def _require_chromium() -> None:
    if Path(CHROMIUM).is_file() and shutil.which(CHROMIUM):
        return
    message = (
        f"CHROMIUM NOT FOUND at {CHROMIUM}: the browser tests cannot run. "
        "Install it with: apt-get install -y chromium"
    )
    if os.environ.get("CI"):
        pytest.fail(message)  # CI must never skip them
    pytest.skip(message)


def _serve(folder: Path, env: dict[str, str]) -> Iterator[ServiceProcess]:
    env = {
        "DATABASE_URL": f"sqlite:///{folder / 'rom-agent.db'}",
        "KB_DIR": str(folder / "kb"),
        "LOG_LEVEL": "info",
        **env,
    }
    process = ServiceProcess(env, folder).start()
    try:
        yield process
    finally:
        process.stop()
        # The admin token and the API key reach the server in headers and bodies only.
        log = process.log_path.read_text()
        assert ADMIN_TOKEN not in log and API_KEY not in log


@pytest.fixture(scope="package")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    _require_chromium()
    folder = tmp_path_factory.mktemp("browser-service")
    env = {
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "API_KEYS": API_KEY,
        "CORS_ORIGINS": "https://intranet.example",
        "ENABLE_CIRCUIT_BREAKER": "true",
        "CIRCUIT_BREAKER_THRESHOLD": "2",
        "CIRCUIT_BREAKER_COOLDOWN_S": str(COOLDOWN_S),
        "ENABLE_FAULT_INJECTION": "true",
        "ENABLE_RETRY": "false",
        "SIMULATOR_CHUNK_DELAY_MS": "60",
    }
    yield from _serve(folder, env)


@pytest.fixture(scope="package")
def fresh_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """Default flags (what the rollout's stage A expects), a short cooldown for stage B."""
    _require_chromium()
    folder = tmp_path_factory.mktemp("rollout-service")
    env = {
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "API_KEYS": API_KEY,
        "CIRCUIT_BREAKER_COOLDOWN_S": "1",
    }
    yield from _serve(folder, env)


@pytest.fixture(scope="package")
def browser(service: ServiceProcess) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
