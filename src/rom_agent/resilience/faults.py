"""Fault injection for staging drills (SPEC §7). Inert unless ENABLE_FAULT_INJECTION is true.

A `FaultPlan` is parsed once per request (`parse_fault_plan`) and applied to every provider
attempt of that request that it targets, *inside* the breaker and the attempt timeout, so an
injected fault travels exactly the path a real one would:

* message starting with `FORCE_ERROR` → each attempt fails with a TRANSIENT 503 marked
  non-retryable, without calling the provider: one counted failure per model reached.
* `X-Fault: status=503;delay_ms=2000;models=rom-sim-1,rom-sim-2;after_chunks=3`
  (every field optional, `;`-separated, `models` comma-separated):
    - `delay_ms`: wait that long (on the injected clock) before the call;
    - `status`: an error of that HTTP status, classified and retryable exactly like a real one;
    - `after_chunks`: the failure comes after the upstream has produced N text chunks. With
      `status`, the upstream then reports that error; without it, the connection just drops
      (the stream ends with no terminator). A non-streamed call is cut after the upstream
      answered;
    - `models`: only these model ids are affected (also limits FORCE_ERROR).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from rom_agent.config import Settings
from rom_agent.domain.errors import (
    ErrorKind,
    ProviderError,
)
from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    StreamEvent,
    TextDelta,
)
from rom_agent.providers.base import (
    Provider,
    classify_status,
)
from rom_agent.resilience.clock import Clock

FORCE_ERROR = "FORCE_ERROR"
INJECTED = "InjectedFault"

_MAX_DELAY_MS = 600_000
_MAX_CHUNKS = 1_000_000


@dataclass(frozen=True, slots=True)
class FaultPlan:
    force_error: bool = False
    status: int | None = None
    delay_s: float = 0.0
    models: frozenset[str] | None = None  # None: every model
    after_chunks: int | None = None

    def affects(self, model: str) -> bool:
        return self.models is None or model in self.models

    # ------------------------------------------------------------------ the injected error

    def error(self) -> ProviderError:
        """A fresh error for one attempt (exceptions carry per-raise state)."""
        if self.force_error:
            return ProviderError(
                ErrorKind.TRANSIENT,
                "injected fault (FORCE_ERROR)",
                status=503,
                error_type=INJECTED,
                retryable=False,
            )
        if self.status is not None:
            return ProviderError(
                classify_status(self.status),
                f"injected fault (status {self.status})",
                status=self.status,
                error_type=INJECTED,
            )
        return ProviderError(
            ErrorKind.TRANSIENT, "injected fault (connection dropped)", error_type=INJECTED
        )

    @property
    def _fails_before_call(self) -> bool:
        return self.force_error or (self.status is not None and self.after_chunks is None)

    # ------------------------------------------------------------------ wrappers

    async def complete(
        self, provider: Provider, request: ChatRequest, clock: Clock
    ) -> ChatResponse:
        if self.delay_s:
            await clock.sleep(self.delay_s)
        if self._fails_before_call:
            raise self.error()
        response = await provider.complete(request)
        if self.after_chunks is not None:
            raise self.error()
        return response

    async def stream(
        self, provider: Provider, request: ChatRequest, clock: Clock
    ) -> AsyncIterator[StreamEvent]:
        if self.delay_s:
            await clock.sleep(self.delay_s)
        if self._fails_before_call:
            raise self.error()
        upstream = provider.stream(request)
        chunks = 0
        cut = False
        try:
            async for event in upstream:
                if isinstance(event, TextDelta):
                    if chunks == self.after_chunks:
                        cut = True
                        break
                    chunks += 1
                yield event
        finally:
            aclose = getattr(upstream, "aclose", None)
            if aclose is not None:
                await aclose()
        if cut and self.status is not None:
            raise self.error()
        # A cut without a status: the "connection" dropped, the stream ends with no StopEvent.


def parse_fault_plan(message: str, header: str | None, settings: Settings) -> FaultPlan | None:
    """The fault plan of one request, or None. Raises ValueError (→ HTTP 400) for a bad header.

    With ENABLE_FAULT_INJECTION off the message is ordinary text and the header is ignored.
    """
    if not settings.enable_fault_injection:
        return None
    force_error = message.lstrip().startswith(FORCE_ERROR)
    fields = parse_fault_header(header) if header and header.strip() else {}
    if not force_error and not fields:
        return None
    return FaultPlan(force_error=force_error, **fields)


def parse_fault_header(value: str) -> dict[str, Any]:
    """`X-Fault` → FaultPlan keyword arguments."""
    fields: dict[str, Any] = {}
    parsed: Any
    for part in value.split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, raw = part.partition("=")
        key, raw = key.strip().lower(), raw.strip()
        if not sep or not raw:
            raise ValueError(f"X-Fault: expected key=value, got {part!r}")
        if key == "status":
            name, parsed = "status", _int(key, raw, 400, 599)
        elif key == "delay_ms":
            name, parsed = "delay_s", _int(key, raw, 0, _MAX_DELAY_MS) / 1000.0
        elif key == "after_chunks":
            name, parsed = "after_chunks", _int(key, raw, 0, _MAX_CHUNKS)
        elif key == "models":
            models = frozenset(model.strip() for model in raw.split(",") if model.strip())
            if not models:
                raise ValueError("X-Fault: models needs at least one model id")
            name, parsed = "models", models
        else:
            raise ValueError(
                f"X-Fault: unknown field {key!r} (known: status, delay_ms, models, after_chunks)"
            )
        if name in fields:
            raise ValueError(f"X-Fault: field {key!r} given twice")
        fields[name] = parsed
    return fields


def _int(key: str, raw: str, low: int, high: int) -> int:
    digits = raw.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()):  # int() also takes "٣", " 3" and "1_0"
        raise ValueError(f"X-Fault: {key} must be an integer, got {raw!r}")
    value = int(raw)
    if not low <= value <= high:
        raise ValueError(f"X-Fault: {key} must be between {low} and {high}, got {value}")
    return value
