"""The rollout's output, also sent to the service so its console can watch a CLI rollout.

`ServiceFeed` wraps the rollout's output stream: every complete line still goes to the
terminal at once, and is queued for a background thread that POSTs batches to
`/admin/rollout/lines` (admin token). Best effort by design: a service without the endpoint
(older version), with the console off, or unreachable makes the feed switch itself off
silently — the rollout never waits on it and never fails because of it. At the end the report
goes to `/admin/rollout/report`, so the console can link to it.

`ROM_AGENT_ROLLOUT_FEED=off` disables it (the console's own child rollout reads the output
directly).
"""

from __future__ import annotations

import os
import queue
import secrets
import threading
from typing import TextIO

from rom_agent.ops.client import AdminClient, ApiCallError

FEED_ENV = "ROM_AGENT_ROLLOUT_FEED"
_BATCH = 50
_CLOSE_WAIT_S = 5.0
_TIMEOUT_S = 3.0


class ServiceFeed:
    """A text stream: writes through to `out`, lines also to the service (see module doc)."""

    def __init__(self, out: TextIO, client: AdminClient, run_id: str | None = None) -> None:
        self.out = out
        self.run_id = run_id or secrets.token_hex(8)
        self._client = client
        self._partial = ""
        self._queue: queue.Queue[list[str] | None] = queue.Queue()
        self.enabled = True
        self._thread = threading.Thread(target=self._send_loop, name="rollout-feed", daemon=True)
        self._thread.start()

    # TextIO's part that `print(..., file=feed, flush=True)` uses.
    def write(self, text: str) -> int:
        self.out.write(text)
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        if lines and self.enabled:
            self._queue.put(lines)
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return self.out.isatty()

    def report(self, text: str) -> None:
        """Send the report, after every line, and stop the sender (waits a few seconds)."""
        self._queue.put(None)
        self._thread.join(_CLOSE_WAIT_S)
        if self.enabled:
            self._post("/admin/rollout/report", {"run": self.run_id, "text": text})

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(_CLOSE_WAIT_S)

    def _send_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = list(item)
            while len(batch) < _BATCH:  # whatever else is already waiting goes along
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._flush_batch(batch)
                    return
                batch.extend(more)
            self._flush_batch(batch)

    def _flush_batch(self, lines: list[str]) -> None:
        if self.enabled and lines:
            self._post("/admin/rollout/lines", {"run": self.run_id, "lines": lines})

    def _post(self, path: str, body: dict[str, object]) -> None:
        try:
            reply = self._client.request("POST", path, body=body, admin=True, timeout_s=_TIMEOUT_S)
        except (ApiCallError, OSError):
            self.enabled = False
            return
        if reply.status != 200:
            self.enabled = False


def feed_enabled() -> bool:
    return os.environ.get(FEED_ENV, "on").lower() not in ("off", "0", "false", "no")
