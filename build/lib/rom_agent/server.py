"""Running the app under uvicorn, with a drain on SIGTERM.

On the first SIGTERM/SIGINT the service stops admitting chat requests (new ones get 503
`DRAINING`, `/ready` answers 503 `draining`) while running and queued ones finish, for at most
`DRAIN_TIMEOUT_S`; then uvicorn shuts down as usual (closing idle connections, waiting for
in-flight responses) and the lifespan flushes the store. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
from types import FrameType

import uvicorn

from rom_agent.config import Settings
from rom_agent.logs import get_logger
from rom_agent.services import Services

DRAIN_TIMEOUT_S = 20.0  # Render waits 30 s between SIGTERM and SIGKILL
SHUTDOWN_GRACE_S = 8  # then in-flight responses the drain did not cover

log = get_logger("rom_agent.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, services: Services) -> None:
        super().__init__(config)
        self._services = services
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None:  # second signal: stop now
            super().handle_exit(sig, frame)
            return
        self._services.bottleneck.start_draining()
        self._drain_task = asyncio.get_event_loop().create_task(self._drain_then_exit(sig, frame))

    async def _drain_then_exit(self, sig: int, frame: FrameType | None) -> None:
        bottleneck = self._services.bottleneck
        log.info("draining", running=bottleneck.running, queued=bottleneck.queued)
        drained = await bottleneck.drained(DRAIN_TIMEOUT_S)
        log.info("drained" if drained else "drain_timeout", running=bottleneck.running)
        super().handle_exit(sig, frame)


def run(settings: Settings, services: Services) -> None:
    from rom_agent.app import create_app

    app = create_app(settings, services=services)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        server_header=False,
    )
    DrainingServer(config, services).run()
