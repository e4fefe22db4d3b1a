"""Loop guardrails (SPEC §6): count the tool calls of one agent run and decide when to stop.

A `RunGuard` is created by the loop at the start of every run from the settings snapshot of
that moment, so nothing leaks between requests and a runtime flag change applies to the next
run. Limits are inclusive and count *executed* calls: in `soft` and `full` at most
`hard_limit` calls run, and the call that reaches a limit is the last one executed.

| mode      | counts | warns at soft | stops at hard | stops on repetition          |
|-----------|--------|---------------|---------------|------------------------------|
| `off`     | no     | no            | no            | no                           |
| `dry-run` | yes    | yes           | would         | would (the `full` rules)     |
| `soft`    | yes    | yes           | yes           | no                           |
| `full`    | yes    | yes           | yes           | yes                          |
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from rom_agent.config import Settings
from rom_agent.domain.events import Events, GuardrailTriggered
from rom_agent.domain.messages import ToolUseBlock
from rom_agent.logs import get_logger

Mode = Literal["off", "dry-run", "soft", "full"]
StopReason = Literal["hard_limit", "repetition"]

# Metric label values of `guardrails_triggered_total{reason}`.
SOFT_LIMIT = "soft_limit"
HARD_LIMIT: StopReason = "hard_limit"
REPETITION: StopReason = "repetition"

_log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class GuardrailReport:
    """The response's `guardrail` object. In dry-run `reason` is what *would* have stopped."""

    mode: Mode
    tool_calls: int
    warning: bool
    stopped: bool
    reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "toolCalls": self.tool_calls,
            "warning": self.warning,
            "stopped": self.stopped,
            "reason": self.reason,
        }


def _call_key(call: ToolUseBlock) -> str:
    # Same tool and same input, whatever the key order the model happened to emit.
    return call.name + "\x00" + json.dumps(call.input, sort_keys=True, default=str)


class RunGuard:
    """Guardrail state for one agent run. Not shared, not reused."""

    def __init__(
        self,
        mode: Mode,
        *,
        soft_limit: int,
        hard_limit: int,
        repetition_limit: int,
        events: Events | None = None,
    ) -> None:
        self.mode = mode
        self._soft = soft_limit
        self._hard = hard_limit
        self._repetition = repetition_limit
        self._events = events
        self._calls = 0
        self._warning = False
        self._reason: StopReason | None = None  # the first stop (or would-be stop)
        self._last_key: str | None = None
        self._streak = 0

    @classmethod
    def start(cls, settings: Settings, events: Events | None = None) -> RunGuard:
        return cls(
            cast(Mode, settings.effective_guardrail_mode),
            soft_limit=settings.guardrail_soft_limit,
            hard_limit=settings.guardrail_hard_limit,
            repetition_limit=settings.guardrail_repetition_limit,
            events=events,
        )

    @property
    def enforcing(self) -> bool:
        return self.mode in ("soft", "full")

    @property
    def stop_reason(self) -> StopReason | None:
        """Why tool use must end now; always None in `off` and `dry-run`."""
        return self._reason if self.enforcing else None

    def admit(self, calls: Sequence[ToolUseBlock]) -> int:
        """Count the calls a model turn requested; return how many of them (a prefix) to run.

        The calls are considered in the order the model emitted them, so parallel calls in
        one turn count exactly as if they had come one per turn.
        """
        if self.mode == "off":
            return len(calls)
        for admitted, call in enumerate(calls):
            if self.stop_reason is not None:
                return admitted
            self._count(call)
        return len(calls)

    def report(self) -> GuardrailReport | None:
        if self.mode == "off":
            return None
        return GuardrailReport(
            mode=self.mode,
            tool_calls=self._calls,
            warning=self._warning,
            stopped=self.stop_reason is not None,
            reason=self._reason,
        )

    # ------------------------------------------------------------------ internals

    def _count(self, call: ToolUseBlock) -> None:
        self._calls += 1
        key = _call_key(call)
        self._streak = self._streak + 1 if key == self._last_key else 1
        self._last_key = key

        if not self._warning and self._calls >= self._soft:
            self._warning = True
            self._trigger(SOFT_LIMIT, call)
        if self._reason is not None:
            return  # dry-run keeps counting after a would-be stop, but reports the first one
        if self._calls >= self._hard:
            self._reason = HARD_LIMIT
            self._trigger(HARD_LIMIT, call)
        elif self.mode != "soft" and self._streak >= self._repetition:
            self._reason = REPETITION
            self._trigger(REPETITION, call)

    def _trigger(self, reason: str, call: ToolUseBlock) -> None:
        if self._events is not None:
            self._events.emit(GuardrailTriggered, reason)
        _log.warning(
            "guardrail_triggered",
            reason=reason,
            mode=self.mode,
            enforced=self.enforcing and reason != SOFT_LIMIT,
            tool_calls=self._calls,
            tool=call.name,
            soft_limit=self._soft,
            hard_limit=self._hard,
            repetition_limit=self._repetition,
        )
