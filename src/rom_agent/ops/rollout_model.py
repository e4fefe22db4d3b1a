"""What a rollout is made of and what it produced: the plan (stage A's limits, the burst
hold), the stages, one run record per stage, and the whole result with its GO/NO-GO verdict.
Shared by the orchestration (`ops.rollout`) and the report (`ops.rollout_report`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from rom_agent.ops.bottleneck_checks import DEFAULT_DELAY_MS
from rom_agent.ops.steps import Sleep, Steps
from rom_agent.ops.target import Target

GUIDE_MAX_CONCURRENT, GUIDE_MAX_QUEUE = 5, 20  # the guide's stage A values (= code defaults)


@dataclass(frozen=True, slots=True)
class Plan:
    max_concurrent: int = GUIDE_MAX_CONCURRENT
    max_queue: int = GUIDE_MAX_QUEUE
    burst_delay_ms: int = DEFAULT_DELAY_MS


@dataclass
class Context:
    target: Target
    plan: Plan
    out: TextIO
    sleep: Sleep = time.sleep


StageBody = Callable[[Context, Steps], None]


@dataclass(frozen=True, slots=True)
class Stage:
    key: str
    title: str
    flags: tuple[str, ...]  # what this stage changes, and rolls back on failure
    body: StageBody


@dataclass
class StageRun:
    stage: Stage
    steps: Steps
    status: str = "not run"  # passed | failed | not run
    seconds: float = 0.0
    rollback: Steps | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass
class Rollout:
    url: str
    plan: Plan
    started: str
    runs: list[StageRun] = field(default_factory=list)
    preflight: Steps | None = None
    final: Steps | None = None
    final_flags: dict[str, Any] = field(default_factory=dict)
    final_sources: dict[str, str] = field(default_factory=dict)
    version: str = "?"
    finished: str = ""
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def go(self) -> bool:
        sections = [self.preflight, *(run.steps for run in self.runs), self.final]
        return (
            not self.interrupted
            and bool(self.runs)
            and all(run.passed for run in self.runs)
            and all(steps is not None and steps.passed for steps in sections)
        )
