"""The composition root's product: every long-lived object of one running service.

Routes reach these through `request.app.state.services`; nothing else is global, so tests can
run several services side by side.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from rom_agent import __version__
from rom_agent.agent.chat import ChatService
from rom_agent.agent.tools import ToolRegistry
from rom_agent.config import Settings
from rom_agent.domain.events import Events
from rom_agent.domain.messages import ModelRef
from rom_agent.flags import FlagStore
from rom_agent.fleet.coordinator import Fleet
from rom_agent.http.drain import InFlight
from rom_agent.instrumentation.prometheus import PrometheusMetrics
from rom_agent.instrumentation.runtime import EventLoopLag
from rom_agent.providers.base import Provider
from rom_agent.resilience.bottleneck import Bottleneck
from rom_agent.resilience.breaker import BreakerRegistry
from rom_agent.resilience.clock import Clock, SystemClock
from rom_agent.resilience.pipeline import Pipeline
from rom_agent.store.backend import Conversations, StoreBackend


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_api_keys(entries: tuple[str, ...]) -> tuple[bytes, ...]:
    """API_KEYS entries are plain keys or `sha256:<hex>`; only digests are kept in memory."""
    return tuple(
        bytes.fromhex(entry.removeprefix("sha256:"))
        if entry.startswith("sha256:")
        else key_digest(entry)
        for entry in entries
    )


@dataclass
class Services:
    settings: Settings  # as started; live values are in `flags.current`
    flags: FlagStore
    events: Events  # what the core reports to; `metrics` is one listener
    metrics: PrometheusMetrics
    clock: Clock
    store: StoreBackend
    conversations: Conversations
    providers: Mapping[str, Provider]
    breakers: BreakerRegistry
    bottleneck: Bottleneck
    pipeline: Pipeline
    tools: ToolRegistry
    chat: ChatService
    fleet: Fleet
    api_key_digests: tuple[bytes, ...] = ()
    in_flight: InFlight = field(default_factory=InFlight)  # chat requests, for the drain
    event_loop_lag: EventLoopLag = field(default_factory=lambda: EventLoopLag(SystemClock()))
    started_at: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    version: str = __version__

    @property
    def chain(self) -> tuple[ModelRef, ...]:
        return self.pipeline.chain

    @property
    def draining(self) -> bool:
        return self.in_flight.draining or self.bottleneck.draining

    def api_key_valid(self, key: str) -> bool:
        if not key:
            return False
        presented = key_digest(key)
        valid = False
        for digest in self.api_key_digests:  # no early exit: time does not depend on position
            valid |= hmac.compare_digest(presented, digest)
        return valid
