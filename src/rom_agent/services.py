"""The composition root: every long-lived object of one running service, built once.

Routes reach these through `request.app.state.services`; nothing else is global, so tests can
run several services side by side.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rom_agent import __version__
from rom_agent.agent.chat import ChatService
from rom_agent.config import Settings
from rom_agent.flags import FlagStore
from rom_agent.metrics import Metrics
from rom_agent.providers.base import ModelRef, Provider
from rom_agent.resilience.clock import Clock
from rom_agent.store.conversations import ConversationStore
from rom_agent.store.database import Database


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_api_keys(entries: tuple[str, ...]) -> tuple[bytes, ...]:
    """API_KEYS entries are plain keys or `sha256:<hex>`; we keep only digests in memory."""
    digests = []
    for entry in entries:
        if entry.startswith("sha256:"):
            digests.append(bytes.fromhex(entry.removeprefix("sha256:")))
        else:
            digests.append(key_digest(entry))
    return tuple(digests)


@dataclass
class Services:
    settings: Settings
    flags: FlagStore
    metrics: Metrics
    clock: Clock
    database: Database
    conversations: ConversationStore
    providers: Mapping[str, Provider]
    chain: tuple[ModelRef, ...]
    chat: ChatService
    # resilience.breaker.BreakerRegistry and resilience.bottleneck.Bottleneck (wired in app.py).
    breakers: Any = None
    bottleneck: Any = None
    api_key_digests: tuple[bytes, ...] = ()
    started_at: float = field(default_factory=time.monotonic)
    version: str = __version__
    draining: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def models(self) -> dict[str, ModelRef]:
        return {ref.id: ref for ref in self.chain}

    def resolve_model(self, name: str) -> ModelRef | None:
        """A chain model by id (`rom-sim-1`) or qualified name (`simulator/rom-sim-1`)."""
        for ref in self.chain:
            if name == ref.id or name == ref.qualified:
                return ref
        return None

    def chain_for(self, first: ModelRef | None) -> tuple[ModelRef, ...]:
        """The fallback chain for a request: the requested model first, then the others."""
        if first is None or first == self.chain[0]:
            return self.chain
        return (first, *(ref for ref in self.chain if ref != first))

    def api_key_valid(self, key: str) -> bool:
        if not key:
            return False
        presented = key_digest(key)
        valid = False
        for digest in self.api_key_digests:  # no early exit: time does not depend on position
            valid |= hmac.compare_digest(presented, digest)
        return valid

    def fault_plan(self, text: str, header: str | None) -> Any:
        return None
