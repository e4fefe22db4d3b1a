"""Real servers for tests: our app under uvicorn on a free loopback port.

`running_app` runs it in a thread of this process (so a test can reach its services);
`ServiceProcess` runs `python -m rom_agent serve` as a separate process (restarts, kill -9).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from rom_agent.app import ServiceApp, create_app, create_services
from rom_agent.config import Settings, load_settings
from rom_agent.services import Services


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def isolated_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings isolated from the developer's environment and `.env`."""
    values: dict[str, object] = {
        "database_url": f"sqlite:///{tmp_path / 'rom-agent.db'}",
        "kb_dir": str(tmp_path / "kb"),
        "log_level": "warning",
        "_env_file": None,
    }
    values.update(overrides)
    return load_settings(**values)


@dataclass
class RunningApp:
    url: str
    services: Services

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)  # type: ignore[arg-type]


@contextlib.contextmanager
def running_app(
    settings: Settings,
    services: Services | None = None,
    *,
    configure: Callable[[ServiceApp], None] | None = None,
    uvloop: bool = False,
) -> Iterator[RunningApp]:
    """`configure` gets the application before it serves (to add a middleware, say); with
    `uvloop`, the server's thread runs production's event loop (the process-wide policy is
    left alone)."""
    services = services or create_services(settings)
    app = create_app(settings, services=services)
    if configure is not None:
        configure(app)
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        loop="asyncio",
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)

    def serve() -> None:
        factory = _uvloop_factory() if uvloop else None
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(server.serve())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)  # polling for startup, not timing behaviour
    try:
        yield RunningApp(f"http://127.0.0.1:{port}", services)
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    import uvloop

    return uvloop.new_event_loop


class ServiceProcess:
    """`python -m rom_agent serve` in a child process with the given environment."""

    def __init__(self, env: Mapping[str, str], cwd: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = {**os.environ, **env, "PORT": str(self.port), "HOST": "127.0.0.1"}
        self._cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = cwd / f"service-{self.port}.log"
        self._log = self.log_path.open("ab")

    def start(self, timeout: float = 20) -> ServiceProcess:
        started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rom_agent", "serve"],
            env=self._env,
            cwd=self._cwd,
            stdout=subprocess.DEVNULL,
            stderr=self._log,  # a file, not a pipe: a full pipe would block the server
        )
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(self.log_path.read_text())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.02)  # polling for startup, not timing behaviour
        raise RuntimeError("service did not become healthy")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
