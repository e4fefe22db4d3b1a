"""PostgreSQL restarted under load: no 200'd turn is lost and the service recovers by itself.

Runs a private PostgreSQL cluster (initdb in a temporary directory, as the `postgres` user),
never the machine's shared one: that one is restarted by nobody."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.engines import MISSING_MARK
from tests.server import ServiceProcess, free_port

PG_BIN = Path("/usr/lib/postgresql")


def pg_tool(name: str) -> str | None:
    found = sorted(PG_BIN.glob(f"*/bin/{name}"))
    return str(found[-1]) if found else None


def as_postgres(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *command],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


@pytest.fixture
def private_postgres() -> object:
    initdb, pg_ctl = pg_tool("initdb"), pg_tool("pg_ctl")
    if not (initdb and pg_ctl and shutil.which("runuser") and os.geteuid() == 0):
        message = f"{MISSING_MARK}: a private PostgreSQL needs initdb/pg_ctl and root"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    # Not under tmp_path: pytest's base directory is private to root, postgres cannot enter it.
    home = Path(tempfile.mkdtemp(prefix="rom-agent-pg-"))
    home.chmod(0o755)
    shutil.chown(home, "postgres")
    data, port = home / "data", free_port()
    as_postgres(initdb, "-D", str(data), "-A", "trust", "-U", "postgres")
    options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=on"
    as_postgres(pg_ctl, "-D", str(data), "-o", options, "-l", str(home / "log"), "-w", "start")

    class Cluster:
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

        @staticmethod
        def restart() -> None:
            # -l: without a log file the server would inherit our pipe and hold it open.
            as_postgres(
                pg_ctl, "-D", str(data), "-l", str(home / "log"), "-m", "fast", "-w", "restart"
            )

    try:
        yield Cluster
    finally:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(home, ignore_errors=True)


def test_a_postgresql_restart_under_load_loses_no_200d_turn(
    tmp_path: Path, private_postgres: object
) -> None:
    url = private_postgres.url  # type: ignore[attr-defined]
    service = ServiceProcess({"DATABASE_URL": url, "LOG_LEVEL": "warning"}, tmp_path).start()
    answered: list[str] = []
    refused: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=service.url, timeout=30) as http:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    response = http.post("/api/chat", json={"message": f"turn {i}"})
                except httpx.TransportError:
                    refused.append(0)
                    continue
                if response.status_code == 200:
                    answered.append(response.json()["conversationId"])
                else:
                    refused.append(response.status_code)
                    assert "error" in response.json()  # the documented error body

    runner = threading.Thread(target=load)
    runner.start()
    try:
        time.sleep(1.5)  # steady load before the restart
        before = len(answered)
        private_postgres.restart()  # type: ignore[attr-defined]
        restarted = len(answered)
        time.sleep(2)  # and after: the pool reconnects by itself
    finally:
        stop.set()
        runner.join()
        service.kill()  # and no graceful flush: what was answered must already be stored

    async def stored() -> set[str]:
        connection = await asyncpg.connect(url)
        try:
            rows = await connection.fetch(
                "SELECT conversation_id FROM messages WHERE role = 'assistant'"
            )
        finally:
            await connection.close()
        return {row["conversation_id"] for row in rows}

    assert before > 0 and len(answered) > restarted  # served before and after the restart
    assert set(answered) <= asyncio.run(stored())
    assert all(code in (0, 500, 503) for code in refused)
    print(f"\npg-restart: {len(answered)} answered 200 (all stored), {len(refused)} refused")
