"""A rollout started from the console: `rom-agent rollout` in a child process, watched live.

The child is exactly the CLI an operator would run (same stages, checks, rollbacks, report),
pointed at this very service. Its output is parsed line by line as it arrives — `== section`,
`-> action`, `[PASS|FAIL|SKIP] step name: detail`, the final `GO` / `NO-GO` — into the state the
console's live stream carries. One rollout at a time per process.

A rollout started from the CLI is watched the same way: its `ServiceFeed` (ops/rollout_feed.py)
POSTs the same lines to `/admin/rollout/lines` and the report to `/admin/rollout/report`.

The admin token (and the chat API key for the drills, when `API_KEYS` is set) reach the child
through its environment, as the CLI documents, never its command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rom_agent.logs import get_logger
from rom_agent.ops.rollout_feed import FEED_ENV

log = get_logger("rom_agent.console.rollout")

_CHECK = re.compile(r"^\[(PASS|FAIL|SKIP)\] (.*)$")
_VERDICT = re.compile(r"^(GO|NO-GO): report written to ")
_MAX_LINES = 500


@dataclass
class RolloutRun:
    started_at: float
    status: str = "running"  # running | GO | NO-GO | failed
    events: list[dict[str, str]] = field(default_factory=list)
    report: Path | None = None
    exit_code: int | None = None
    client: str = ""
    source: str = "console"  # console (started from the page) | cli (watched)
    run_id: str = ""
    last_line_at: float = 0.0

    def feed(self, line: str) -> None:
        self.last_line_at = time.time()
        stripped = line.strip()
        if not stripped or len(self.events) >= _MAX_LINES:
            return
        if stripped.startswith("=== "):
            self.events.append({"kind": "stage", "text": stripped.strip("= ")})
        elif stripped.startswith("== "):
            self.events.append({"kind": "section", "text": stripped[3:]})
        elif stripped.startswith("-> "):
            self.events.append({"kind": "action", "text": stripped[3:]})
        elif match := _CHECK.match(stripped):
            self.events.append({"kind": "check", "outcome": match[1], "text": match[2]})
        elif verdict := _VERDICT.match(stripped):
            self.status = verdict[1]
            self.events.append({"kind": "verdict", "text": verdict[1]})
        elif stripped.startswith(("observed:", "expected:")) and self.events:
            last = self.events[-1]
            last["text"] = f"{last['text']} — {stripped}"
        else:
            self.events.append({"kind": "info", "text": stripped})

    def view(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "source": self.source,
            "runId": self.run_id,
            "client": self.client,
            "startedAt": self.started_at,
            "lastLineAt": self.last_line_at,
            "events": self.events,
            "exitCode": self.exit_code,
            "reportUrl": "/console/rollout/report" if self.report_ready else None,
        }

    @property
    def report_ready(self) -> bool:
        return self.report is not None and self.report.is_file()


class RolloutRunner:
    def __init__(self) -> None:
        self.current: RolloutRun | None = None
        self._task: asyncio.Task[None] | None = None
        self._folder_path: Path | None = None

    @property
    def _folder(self) -> Path:
        """Where reports go: made on first use (most processes never run a rollout)."""
        if self._folder_path is None:
            self._folder_path = Path(tempfile.mkdtemp(prefix="rom-agent-rollout-"))
        return self._folder_path

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def watch(self, run_id: str, lines: list[str], client: str) -> RolloutRun:
        """Lines of a CLI rollout (its feed). A new run id starts a new watched run, unless
        the console's own rollout is running (RuntimeError)."""
        run = self.current
        if run is None or run.run_id != run_id:
            if self.running:
                raise RuntimeError("a rollout started from the console is running")
            run = RolloutRun(started_at=time.time(), client=client, source="cli", run_id=run_id)
            self.current = run
        for line in lines:
            run.feed(line)
        return run

    def save_report(self, run_id: str, text: str) -> bool:
        run = self.current
        if run is None or run.run_id != run_id or run.source != "cli":
            return False
        run.report = self._folder / f"report-{run_id}.md"
        run.report.write_text(text, encoding="utf-8")
        return True

    def start(
        self,
        *,
        url: str,
        token: str,
        client: str,
        options: dict[str, int],
        api_key: str | None = None,
    ) -> RolloutRun:
        run = RolloutRun(started_at=time.time(), client=client, run_id=secrets.token_hex(8))
        run.report = self._folder / "STAGING_VALIDATION_REPORT.md"
        with contextlib.suppress(FileNotFoundError):
            run.report.unlink()
        self.current = run
        # This child's output is read directly: its own feed to the service stays off.
        env = {"ADMIN_TOKEN": token, FEED_ENV: "off"}
        if api_key:
            env["ROM_AGENT_API_KEY"] = api_key  # the chat drills' key when API_KEYS is set
        self._task = asyncio.create_task(self._run(run, url, env, options))
        return run

    async def _run(
        self, run: RolloutRun, url: str, secrets: dict[str, str], options: dict[str, int]
    ) -> None:
        assert run.report is not None
        args = [sys.executable, "-m", "rom_agent", "rollout", "--url", url]
        args += ["--report", str(run.report)]
        for name, value in options.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        env = {**os.environ, **secrets, "PYTHONUNBUFFERED": "1"}
        log.warning("rollout started from the console", client=run.client)
        try:
            process = await asyncio.create_subprocess_exec(
                *args,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            assert process.stdout is not None
            try:
                async for raw in process.stdout:
                    run.feed(raw.decode("utf-8", "replace"))
                run.exit_code = await process.wait()
            except asyncio.CancelledError:
                # Ctrl-C is what makes the CLI roll the current stage back and write its report.
                process.send_signal(signal.SIGINT)
                raise
        except OSError as exc:
            run.events.append({"kind": "info", "text": f"could not start: {exc}"})
            run.exit_code = -1
        if run.status == "running":
            run.status = "failed"
        log.warning("rollout from the console ended", status=run.status, exit_code=run.exit_code)

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
