"""Model fallback (SPEC §4): the chain a request walks, and the bookkeeping of that walk.

Which model is next is decided here; how one model is tried (retry, breaker, timeout) is the
pipeline's. Rules:

* a model whose breaker rejects the call is skipped without spending a call (reason
  `circuit_open`);
* a model that fails after its retries is left (reason `error`, `timeout`, `rate_limited`);
* a model that cannot serve this request is left at once (reason `context_length`,
  `content_filter`, `model_error`);
* a REQUEST error (the request itself is invalid) never reaches here: it ends the walk.

When the walk runs out: if no model was even called because every breaker was OPEN, the
answer is `CircuitOpenError` (503 + Retry-After); if every model said the request exceeds its
context window, `ContextLengthExceededError` (400: the client's to fix); otherwise
`UpstreamFailedError` (502). A mix (one model too small, another down) is a 502.
"""

from __future__ import annotations

from collections.abc import Sequence

from rom_agent.domain.events import (
    Events,
    FallbackAttempted,
    FallbackExhausted,
    FallbackMoved,
    FallbackSucceeded,
)
from rom_agent.domain.messages import ModelRef
from rom_agent.resilience.errors import (
    CIRCUIT_OPEN,
    CONTEXT_LENGTH,
    AttemptFailure,
    CircuitOpenError,
    ContextLengthExceededError,
    PipelineError,
    UpstreamFailedError,
)


def build_chain(
    configured: Sequence[ModelRef],
    primary: str | None = None,
    fallbacks: Sequence[str] | None = None,
) -> tuple[ModelRef, ...]:
    """The chain of one request.

    * nothing given → the configured chain (MODEL_CHAIN);
    * `primary` → that model first, then the rest of the configured chain in order;
    * `fallbacks` → the primary (or the configured first) followed by exactly these.

    Models are named by id (`rom-sim-1`) or qualified (`simulator/rom-sim-1`) and must be
    configured: an unknown one raises ValueError (→ 400). Duplicates are dropped.
    """
    if primary is None and fallbacks is None:
        return tuple(configured)
    head = _lookup(configured, primary) if primary is not None else configured[0]
    rest = configured if fallbacks is None else [_lookup(configured, name) for name in fallbacks]
    chain = [head]
    for model in rest:
        if model not in chain:
            chain.append(model)
    return tuple(chain)


def _lookup(configured: Sequence[ModelRef], name: str) -> ModelRef:
    for model in configured:
        if name in (model.id, model.qualified):
            return model
    raise ValueError(f"unknown model {name!r}")


class ChainRun:
    """One request's walk down the chain: what was tried, and the fallback metrics."""

    __slots__ = ("_events", "_open_retry_after", "attempts", "chain", "tried")

    def __init__(self, chain: Sequence[ModelRef], events: Events) -> None:
        if not chain:
            raise ValueError("empty model chain")
        self.chain = chain
        self._events = events
        self.tried: list[AttemptFailure] = []
        self.attempts = 0  # provider calls made, retries included
        self._open_retry_after: float | None = None

    def calling(self, index: int) -> None:
        """The first call to `chain[index]` is about to be made."""
        self._events.emit(FallbackAttempted, self.chain[index].id)

    def rejected(self, index: int, failure: AttemptFailure, retry_after_s: float) -> None:
        """`chain[index]`'s breaker refused the call."""
        if self._open_retry_after is None or retry_after_s < self._open_retry_after:
            self._open_retry_after = retry_after_s
        self.failed(index, failure)

    def failed(self, index: int, failure: AttemptFailure) -> None:
        """`chain[index]` is left; record why and the move to the next model, if any."""
        self.tried.append(failure)
        if index + 1 < len(self.chain):
            self._events.emit(
                FallbackMoved, self.chain[index].id, self.chain[index + 1].id, failure.reason
            )

    def succeeded(self, index: int) -> None:
        self._events.emit(FallbackSucceeded, self.chain[index].id)

    def exhausted(self) -> PipelineError:
        """The error that ends a walk with no answer."""
        if self._open_retry_after is not None and all(
            failure.reason == CIRCUIT_OPEN for failure in self.tried
        ):
            return CircuitOpenError([model.id for model in self.chain], self._open_retry_after)
        self._events.emit(FallbackExhausted)
        if all(failure.reason == CONTEXT_LENGTH for failure in self.tried):
            return ContextLengthExceededError(self.tried)
        return UpstreamFailedError(self.tried)
