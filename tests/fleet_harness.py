"""Real engines and real replicas for the fleet tests: a private redis-server (so SIGSTOP and
CLIENT KILL never touch the machine's shared Redis) and `rom-agent serve` processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest

from tests.engines import MISSING_MARK
from tests.server import ServiceProcess, free_port


def require_redis_server() -> None:
    if shutil.which("redis-server") and shutil.which("redis-cli"):
        return
    message = f"{MISSING_MARK}: redis-server is not installed (apt-get install redis-server)"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI requires it)")
    pytest.skip(message)


class PrivateRedis:
    """A redis-server of our own on a free port, nothing on disk."""

    def __init__(self, workdir: Path) -> None:
        require_redis_server()
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        workdir.mkdir(parents=True, exist_ok=True)
        self._log = (workdir / f"redis-{self.port}.log").open("ab")
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(workdir),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while self.cli("PING") != "PONG":
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("private redis-server did not start")
            time.sleep(0.02)  # polling for startup

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return done.stdout.strip()

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.process.terminate()
        self.process.wait(timeout=10)
        self._log.close()


class Replica(ServiceProcess):
    def __init__(self, name: str, env: Mapping[str, str], cwd: Path) -> None:
        super().__init__({**env, "REPLICA_ID": name}, cwd)
        self.name = name

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-Admin-Token": token}, timeout=30)
