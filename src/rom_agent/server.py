"""Running the app under uvicorn: `started` once bound, a drain on SIGTERM, exit 0 when clean.

On the first SIGTERM/SIGINT the service stops admitting chat requests, whatever the flags (new
ones get 503 `DRAINING`, `/ready` answers 503 `draining`), while running and queued ones finish,
for at most `DRAIN_TIMEOUT_S`; then uvicorn shuts down as usual (closing idle connections,
waiting `SHUTDOWN_GRACE_S` for responses still in flight) and the lifespan flushes the store.
A second signal exits at once. The exit status is 0 after a drain that finished, 1 when the
drain timed out (requests were cut), and uvicorn's own status when startup fails.
"""

from __future__ import annotations

import asyncio
import socket
from types import FrameType

import uvicorn

from rom_agent import __version__
from rom_agent.config import Settings
from rom_agent.http.protocol import protocol_for
from rom_agent.logs import get_logger
from rom_agent.services import Services

SHUTDOWN_GRACE_S = 5  # after the drain: responses the drain did not cover (admin, health)

log = get_logger("rom_agent.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, services: Services) -> None:
        super().__init__(config)
        self._services = services
        self._drain_task: asyncio.Task[None] | None = None
        self.drained_cleanly = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:  # only once the port is bound; a failed bind exits inside startup
            services = self._services
            log.info(
                "started",
                version=__version__,
                host=self.config.host,
                port=self.config.port,
                models=[ref.qualified for ref in services.chain],
                database=services.store.display,
            )

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None or not self.started:
            # A second signal, or one before the port was bound: uvicorn's own handling
            # (stop now; the process ends with the signal's status).
            super().handle_exit(sig, frame)
            return
        # Not recorded in uvicorn's captured signals: it would re-raise the signal after a
        # clean shutdown, and the process would end "killed by SIGTERM" (143) instead of 0.
        self._services.in_flight.start_draining()
        self._services.bottleneck.start_draining()
        self._drain_task = asyncio.get_event_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        in_flight = self._services.in_flight
        timeout_s = self._services.flags.current.drain_timeout_s
        log.info("draining", running=in_flight.running, timeout_s=timeout_s)
        self.drained_cleanly = await in_flight.drained(timeout_s)
        if self.drained_cleanly:
            log.info("drained")
        else:
            log.warning("drain timed out", running=in_flight.running, timeout_s=timeout_s)
        self.should_exit = True


def run(settings: Settings, services: Services) -> int:
    """Serve until stopped; the process exit status (see the module docstring)."""
    from rom_agent.app import create_app

    app = create_app(settings, services=services)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=protocol_for(settings),
        timeout_keep_alive=settings.keepalive_timeout_s,  # type: ignore[arg-type]
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        server_header=False,
    )
    server = DrainingServer(config, services)
    server.run()
    return 0 if server.drained_cleanly else 1
