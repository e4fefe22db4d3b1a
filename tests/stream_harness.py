"""Shared harness of the stream fault tests: a fake upstream on its own loop, the gateway in
front of it, SSE readers, and the recorder that turns test runs into the fault table.

Everything listens on 127.0.0.1. The fake runs in a thread with its own event loop and the
gateway under uvicorn in another, so a test is plain synchronous code (httpx or the official
`openai` SDK as the client) and no loop is ever blocked by another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson

from rom_agent.app import create_services
from rom_agent.services import Services
from tests.fakes import DUMMY_API_KEY, Behaviour, FakeUpstream
from tests.server import RunningApp, isolated_settings, running_app

F = TypeVar("F", bound=FakeUpstream)

PRIMARY_TEXT = "Primary says: the quick brown fox jumps over the lazy dog."
BACKUP_TEXT = "Backup says: pack my box with five dozen liquor jugs."
PRIMARY_CHUNKS = len(Behaviour(text=PRIMARY_TEXT).text_chunks())  # 11 word-sized deltas
BACKUP_CHUNKS = len(Behaviour(text=BACKUP_TEXT).text_chunks())
MODELS = ("primary", "backup")

# Short real-time limits so the whole matrix runs in seconds. Never asserted on.
FAST: dict[str, Any] = {
    "first_token_timeout_s": 1.0,  # 0.3 s starved restarts on a loaded 2-core machine
    "stream_idle_timeout_s": 0.3,
    "attempt_timeout_s": 1.0,
    "request_timeout_s": 10.0,
    "retry_base_delay_ms": 1,
    "retry_max_delay_ms": 5,
}


@contextlib.contextmanager
def threaded_fake(factory: type[F]) -> Iterator[F]:
    """A fake upstream serving from a thread of its own (its own event loop)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=f"fake-{factory.name}", daemon=True)
    thread.start()
    fake = factory()
    try:
        asyncio.run_coroutine_threadsafe(fake.start(), loop).result(10)
        yield fake
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextlib.contextmanager
def gateway(tmp_path: Path, fake: FakeUpstream, **overrides: Any) -> Iterator[RunningApp]:
    """The real service (uvicorn, real providers) with `openai/primary,openai/backup` on `fake`."""
    values: dict[str, Any] = {
        "model_chain": "openai/primary,openai/backup",
        "openai_base_url": f"{fake.url}/v1",
        "openai_api_key": DUMMY_API_KEY,
        **FAST,
    }
    values.update(overrides)
    settings = isolated_settings(tmp_path, **values)
    services = create_services(settings)
    # Production's event loop (uvloop), as the service runs it.
    with running_app(settings, services, uvloop=True) as running:
        yield running


# --------------------------------------------------------------------------- SSE


def parse_sse(raw: bytes) -> list[bytes]:
    """The `data` payloads of an SSE body, in order."""
    payloads = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [line for line in block.split(b"\n") if line]
        if not lines:
            continue
        assert all(line.startswith(b"data: ") for line in lines), block
        payloads.append(b"\n".join(line[6:] for line in lines))
    return payloads


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """Our route's events: every payload is one JSON object."""
    return [orjson.loads(payload) for payload in parse_sse(raw)]


def post_stream(client: httpx.Client, body: dict[str, Any]) -> tuple[httpx.Response, bytes]:
    with client.stream("POST", "/api/chat/stream", json=body) as response:
        raw = response.read()
    return response, raw


# --------------------------------------------------------------------------- fault table


@dataclass
class FaultRow:
    """One line of docs/streaming.md, filled from what a test actually observed."""

    fault: str
    route: str
    status: int
    events: str  # what the client saw, compactly
    complete: str  # "yes" / "no" / "—"
    model: str
    upstream: dict[str, int]  # model -> requests received
    note: str = ""
    before: str = ""  # the same fault with continuation and hedging off, when compared


ROWS: list[FaultRow] = []


def record(row: FaultRow) -> None:
    ROWS.append(row)


def dump_rows() -> None:
    """Append the recorded rows to $FAULT_TABLE_OUT (JSON lines), when set."""
    target = os.environ.get("FAULT_TABLE_OUT")
    if not target or not ROWS:
        return
    with open(target, "ab") as out:
        for row in ROWS:
            out.write(orjson.dumps(asdict(row)) + b"\n")
    ROWS.clear()


def compact_events(events: list[dict[str, Any]]) -> str:
    """`connected, chunk×5, done` — the event types with runs collapsed."""
    parts: list[str] = []
    last, count = None, 0
    for event in events:
        kind = event.get("type", "?")
        if kind == "error":
            kind = f"error {event.get('code')}"
        if kind == last:
            count += 1
            continue
        if last is not None:
            parts.append(last if count == 1 else f"{last}×{count}")
        last, count = kind, 1
    if last is not None:
        parts.append(last if count == 1 else f"{last}×{count}")
    return ", ".join(parts)


def upstream_counts(*fakes: FakeUpstream) -> dict[str, int]:
    """Requests each model of the chain received, over the fakes serving it."""
    return {model: sum(len(f.requests_for(model)) for f in set(fakes)) for model in MODELS}


# --------------------------------------------------------------------------- faults


def prime(*fakes: FakeUpstream) -> None:
    """Fresh counters; `primary` and `backup` answer with their own text unless scripted."""
    for fake in fakes:
        fake.reset()
        fake.model_defaults = {
            "primary": Behaviour(text=PRIMARY_TEXT),
            "backup": Behaviour(text=BACKUP_TEXT),
        }


def breaker_failures(services: Services, model: str) -> float:
    value = services.metrics.registry.get_sample_value(
        "circuit_breaker_failure_total", {"operation": "converse", "model": model}
    )
    return value or 0.0


@dataclass(frozen=True)
class Fault:
    """A fault on the primary and what the client must see."""

    name: str
    script: tuple[Behaviour, ...] = ()  # the primary's next requests, then it answers
    persistent: Behaviour | None = None  # the primary does this on every request
    backup: Behaviour | None = None  # the backup does this on every request
    outcome: str = "done"  # "done", or the code of the `error` event
    model: str | None = "primary"  # whose answer the client got
    requests: tuple[int, int] = (1, 0)  # received by (primary, backup)
    chunks: int | None = None  # chunks sent before the error event
    counted: int = 0  # failures the primary's breaker counted
    recoverable: bool = True
    id: str = ""
    usage: tuple[int, int] | None = None  # (input, output) the client must be told, if set
    # Stream failover (issue 16):
    expected: str | None = None  # the complete answer (default: the answering model's text)
    committed_by: str | None = None  # whose first chunk reached the client (default: `model`)
    prefills: tuple[int, int] = (0, 0)  # prefilled requests received by (primary, backup)
    settings: tuple[tuple[str, Any], ...] = ()  # gateway settings of this row
    compare: bool = False  # also run it with continuation and hedging off: the "before"
    before: str = ""  # what it did before issue 16, when no flag reproduces it

    def expected_text(self) -> str:
        if self.expected is not None:
            return self.expected
        return PRIMARY_TEXT if self.model == "primary" else BACKUP_TEXT

    def first_model(self) -> str | None:
        return self.committed_by or self.model


CONTEXT = "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens."
# OpenAI's own body for it (code `string_above_max_length`): "too long", yet no context error.
TOO_LONG = (
    "Invalid 'messages[0].content': string too long. Expected a string with maximum length "
    "10485760, but got a string with length 10485761 instead."
)
# Outcomes that are the client's to fix: a 400 whose `recoverable` is false.
CLIENT_OUTCOMES = frozenset({"INVALID_REQUEST", "CONTENT_FILTERED", "CONTEXT_LENGTH_EXCEEDED"})
# In OpenAI's error shape, `error.code` is OpenAI's own code where it has one.
OPENAI_CODES = {
    "CONTENT_FILTERED": "content_policy_violation",
    "CONTEXT_LENGTH_EXCEEDED": "context_length_exceeded",
}

OPENAI_FAULTS = [
    Fault(
        "429 with `Retry-After: 1` (fits the deadline)",
        script=(Behaviour(status=429, retry_after=1),),
        requests=(2, 0),
        counted=1,
        id="429-retry-after",
    ),
    Fault(
        "429 with `Retry-After: 60` (past the deadline)",
        persistent=Behaviour(status=429, retry_after=60),
        model="backup",
        requests=(1, 1),
        counted=1,
        id="429-retry-after-too-long",
    ),
    Fault(
        "429 without `Retry-After`",
        script=(Behaviour(status=429),),
        requests=(2, 0),
        counted=1,
        id="429-no-retry-after",
    ),
    Fault(
        "500 once, then success",
        script=(Behaviour(status=500),),
        requests=(2, 0),
        counted=1,
        id="500-once",
    ),
    Fault(
        "503 persistent",
        persistent=Behaviour(status=503),
        model="backup",
        requests=(4, 1),
        counted=4,
        id="503-persistent",
    ),
    Fault(
        "connection reset (every request)",
        persistent=Behaviour(reset=True),
        model="backup",
        requests=(4, 1),
        counted=4,
        id="reset",
    ),
    Fault(
        "cut before the first chunk, once",
        script=(Behaviour(text=PRIMARY_TEXT, cut_after=0),),
        requests=(2, 0),
        counted=1,
        id="cut-before-first-chunk",
    ),
    Fault(
        "silent provider (no bytes at all)",
        persistent=Behaviour(delay_s=30),
        model="backup",
        requests=(1, 1),
        counted=1,
        id="silent",
    ),
    Fault(
        "slow first token (headers, then nothing)",
        persistent=Behaviour(text=PRIMARY_TEXT, first_byte_delay_s=30),
        model="backup",
        requests=(1, 1),
        counted=1,
        id="slow-first-token",
    ),
    # After the commit point: continued (issue 16). "once" = the next request to that model
    # is fine; the fake upstreams are deterministic, so a restart re-produces the same text.
    Fault(
        "cut mid-stream (after 2 chunks), once: same model continues",
        script=(Behaviour(text=PRIMARY_TEXT, cut_after=2),),
        requests=(2, 0),
        counted=1,
        compare=True,
        id="cut-mid-stream",
    ),
    Fault(
        "stall mid-stream (after 2 chunks), once",
        script=(Behaviour(text=PRIMARY_TEXT, stall_after=2),),
        requests=(2, 0),
        counted=1,
        compare=True,
        id="stall-mid-stream",
    ),
    Fault(
        "malformed chunk (after 2 chunks), once",
        script=(Behaviour(text=PRIMARY_TEXT, malformed_after=2),),
        requests=(2, 0),
        counted=1,
        compare=True,
        id="malformed-chunk",
    ),
    Fault(
        "in-stream error object (after 2 chunks), once",
        script=(Behaviour(text=PRIMARY_TEXT, stream_error_after=2),),
        requests=(2, 0),
        counted=1,
        compare=True,
        id="in-stream-error",
    ),
    Fault(
        "missing terminator (all text, no `finish_reason`, clean end), once",
        script=(Behaviour(text=PRIMARY_TEXT, missing_terminator=True),),
        requests=(2, 0),
        counted=1,
        compare=True,
        id="missing-terminator",
    ),
    Fault(
        "cut mid-stream, every time; the fallback gives the same answer: fallback continues",
        persistent=Behaviour(text=PRIMARY_TEXT, cut_after=2),
        backup=Behaviour(text=PRIMARY_TEXT),
        model="backup",
        committed_by="primary",
        expected=PRIMARY_TEXT,
        requests=(2, 1),
        counted=2,
        compare=True,
        id="cut-fallback-continues",
    ),
    Fault(
        "cut mid-stream, every time; the fallback's answer diverges",
        persistent=Behaviour(text=PRIMARY_TEXT, cut_after=2),
        outcome="STREAM_INTERRUPTED",
        chunks=2,
        requests=(2, 1),
        counted=2,
        compare=True,
        id="cut-fallback-diverges",
    ),
    Fault(
        "cut mid-stream; the fallback rejects prefills and is not declared: restarted, no prefill",
        persistent=Behaviour(text=PRIMARY_TEXT, cut_after=2),
        backup=Behaviour(text=PRIMARY_TEXT, prefill="reject"),
        model="backup",
        committed_by="primary",
        expected=PRIMARY_TEXT,
        requests=(2, 1),
        counted=2,
        compare=True,
        id="prefill-rejecting-fallback-undeclared",
    ),
    Fault(
        "cut mid-stream; the fallback is declared prefill-capable but rejects it (400)",
        persistent=Behaviour(text=PRIMARY_TEXT, cut_after=2),
        backup=Behaviour(text=PRIMARY_TEXT, prefill="reject"),
        outcome="STREAM_INTERRUPTED",
        chunks=2,
        requests=(2, 1),
        prefills=(0, 1),
        counted=2,
        settings=(("prefill_models", "openai/backup"),),
        compare=True,
        id="prefill-rejected-by-declared-fallback",
    ),
    Fault(
        "cut mid-stream; the fallback is declared prefill-capable: prefill continuation",
        persistent=Behaviour(text=PRIMARY_TEXT, cut_after=2),
        backup=Behaviour(text=PRIMARY_TEXT, prefill="continue"),
        model="backup",
        committed_by="primary",
        expected=PRIMARY_TEXT,
        requests=(2, 1),
        prefills=(0, 1),
        counted=2,
        settings=(("prefill_models", "openai/backup"),),
        compare=True,
        id="prefill-fallback-continues",
    ),
    Fault(
        "silent primary, hedge after 0.5 s (`HEDGE_DELAY_S`): the hedge wins",
        persistent=Behaviour(delay_s=30),
        model="backup",
        requests=(1, 1),
        counted=0,
        settings=(("hedge_delay_s", 0.5), ("first_token_timeout_s", 3.0)),
        compare=True,
        id="silent-primary-hedged",
    ),
    Fault(
        "slow but healthy primary (first token after 0.05 s, under a 0.5 s hedge delay)",
        persistent=Behaviour(text=PRIMARY_TEXT, first_byte_delay_s=0.05),
        requests=(1, 0),
        settings=(("hedge_delay_s", 0.5), ("first_token_timeout_s", 2.0)),
        compare=True,
        id="slow-primary-not-hedged",
    ),
    Fault(
        "`finish_reason` and usage, then a clean end without `[DONE]`",
        persistent=Behaviour(text=PRIMARY_TEXT, usage=(21, 11), omit_done=True),
        usage=(21, 11),
        before="a cut: error STREAM_INTERRUPTED, not stored (fault table of 2026-11-26)",
        id="no-done-after-finish-reason",
    ),
    Fault(
        "context length exceeded (400 `context_length_exceeded`)",
        persistent=Behaviour(status=400, error_type="context_length_exceeded", message=CONTEXT),
        model="backup",
        requests=(1, 1),
        id="context-length",
    ),
    Fault(
        "content filter on the prompt (400 `content_filter`): the caller's answer",
        persistent=Behaviour(status=400, error_type="content_filter"),
        outcome="CONTENT_FILTERED",
        model=None,
        requests=(1, 0),
        recoverable=False,
        id="content-filter-prompt",
    ),
    Fault(
        "content filter mid-answer (`finish_reason: content_filter`)",
        persistent=Behaviour(text=PRIMARY_TEXT, stop_reason="content_filter"),
        outcome="CONTENT_FILTERED",
        chunks=PRIMARY_CHUNKS,
        recoverable=False,
        id="content-filter-answer",
    ),
    Fault(
        "context length exceeded on every model of the chain",
        persistent=Behaviour(status=400, error_type="context_length_exceeded", message=CONTEXT),
        backup=Behaviour(status=400, error_type="context_length_exceeded", message=CONTEXT),
        outcome="CONTEXT_LENGTH_EXCEEDED",
        model=None,
        requests=(1, 1),
        recoverable=False,
        id="context-length-everywhere",
    ),
    Fault(
        "string too long (400 `string_above_max_length`): the request's fault, no fallback",
        persistent=Behaviour(status=400, error_type="string_above_max_length", message=TOO_LONG),
        outcome="INVALID_REQUEST",
        model=None,
        recoverable=False,
        id="string-too-long",
    ),
    Fault(
        "`[DONE]` without finish_reason before any text (llama.cpp interrupted it)",
        persistent=Behaviour(text="", done_without_finish=True),
        model="backup",
        requests=(1, 1),
        id="done-without-finish",
    ),
    Fault(
        "empty 200 to a streamed over-long prompt (llama.cpp); unstreamed it says why",
        script=(
            Behaviour(empty_body=True),
            Behaviour(status=400, error_type="context_length_exceeded", message=CONTEXT),
        ),
        model="backup",
        requests=(2, 1),
        id="empty-200",
    ),
    Fault(
        "invalid request (400 `invalid_request_error`)",
        persistent=Behaviour(status=400, message="'temperature' must be at most 2"),
        outcome="INVALID_REQUEST",
        model=None,
        recoverable=False,
        id="invalid-request",
    ),
    Fault(
        "both models down (503 persistent on both)",
        persistent=Behaviour(status=503),
        backup=Behaviour(status=503),
        outcome="UPSTREAM_FAILED",
        model=None,
        requests=(4, 4),
        counted=4,
        id="both-down",
    ),
]
