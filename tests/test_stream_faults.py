"""`POST /api/chat/stream` against real fake upstreams: the stream fault matrix (SPEC §3, §4).

One commit point, the first chunk sent to the client. Before it a failure is retried or falls
back invisibly (a first-token timeout included); after it, a cut, a stall, a corrupt chunk or a
missing terminator ends the stream with an `error` event, never `done`. Every case runs the real
service under uvicorn, the real OpenAI (or Bedrock) provider and a fake upstream on loopback,
and checks what the client saw, which model answered, whether the turn was stored, how many
requests each model received and how many failures its breaker counted. The rows recorded here
are docs/streaming.md's fault table (`python bench/fault_table.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes import Behaviour, FakeUpstream, ToolCall
from tests.fakes.bedrock_server import FakeBedrock
from tests.fakes.openai_server import FakeOpenAI
from tests.gates import wait_until
from tests.stream_harness import (
    BACKUP_TEXT,
    MODELS,
    OPENAI_FAULTS,
    PRIMARY_TEXT,
    Fault,
    FaultRow,
    breaker_failures,
    compact_events,
    dump_rows,
    gateway,
    post_stream,
    prime,
    record,
    sse_events,
    threaded_fake,
    upstream_counts,
)

pytest_plugins = ("tests.fakes.fixtures",)

ROUTE = "/api/chat/stream"


@pytest.fixture(scope="module", autouse=True)
def _fault_table() -> Iterator[None]:
    yield
    dump_rows()


@pytest.fixture(scope="module")
def openai_fake() -> Iterator[FakeOpenAI]:
    with threaded_fake(FakeOpenAI) as fake:
        yield fake


@pytest.fixture(scope="module")
def bedrock_fake() -> Iterator[FakeBedrock]:
    with threaded_fake(FakeBedrock) as fake:
        yield fake


# --------------------------------------------------------------------------- the SSE contract


def check_sse_contract(events: list[dict[str, Any]]) -> None:
    """SPEC §3: `connected`, `chunk`s numbered from 0, then exactly one `done` or `error`."""
    assert events[0]["type"] == "connected"
    assert isinstance(events[0]["conversationId"], str)
    *middle, last = events[1:]
    for index, event in enumerate(middle):
        assert event["type"] == "chunk", event
        assert set(event) == {"type", "content", "chunkIndex"}
        assert event["chunkIndex"] == index
        assert isinstance(event["content"], str) and event["content"]
    assert last["type"] in ("done", "error"), last
    if last["type"] == "done":
        assert {"content", "conversationId", "model", "usage"} <= set(last)
        assert set(last["usage"]) == {"inputTokens", "outputTokens", "totalTokens"}
        assert last["content"] == "".join(event["content"] for event in middle)
    else:
        assert set(last) == {"type", "error", "code", "recoverable"}
        assert isinstance(last["error"], str) and last["error"]
        assert isinstance(last["recoverable"], bool)


def streamed_text(events: list[dict[str, Any]]) -> str:
    return "".join(event["content"] for event in events if event["type"] == "chunk")


def test_sse_events_are_exactly_the_specs(tmp_path: Path, openai_fake: FakeOpenAI) -> None:
    prime(openai_fake)
    with gateway(tmp_path, openai_fake) as app, app.client() as client:
        response, raw = post_stream(client, {"message": "hi", "conversationId": "sse-1"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    # Every event is one `data: {json}` line followed by a blank line.
    assert raw.startswith(b"data: {") and raw.endswith(b"}\n\n")
    blocks = raw.split(b"\n\n")[:-1]
    assert all(b.startswith(b"data: {") and b.endswith(b"}") and b"\n" not in b for b in blocks)
    events = sse_events(raw)
    check_sse_contract(events)
    assert events[0] == {"type": "connected", "conversationId": "sse-1"}
    # Chunks that reach us together are forwarded together, so only the text is fixed.
    assert streamed_text(events) == PRIMARY_TEXT
    done = events[-1]
    assert done["content"] == PRIMARY_TEXT
    assert done["conversationId"] == "sse-1"
    assert done["model"] == done["modelUsed"] == "primary"
    assert done["fallbackUsed"] is False
    assert done["usage"] == {"inputTokens": 12, "outputTokens": 7, "totalTokens": 19}
    # The upstream was asked for a stream with usage.
    sent = openai_fake.requests_for("primary")[0].json
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


# --------------------------------------------------------------------------- the fault matrix


def stage(fault: Fault, primary_fake: FakeUpstream, backup_fake: FakeUpstream) -> None:
    """Fresh fakes scripted for `fault`."""
    prime(primary_fake, backup_fake)
    if fault.script:
        primary_fake.script(fault.script, model="primary")
    if fault.persistent is not None:
        primary_fake.model_defaults["primary"] = fault.persistent
    if fault.backup is not None:
        backup_fake.model_defaults["backup"] = fault.backup


def before_status(
    tmp_path: Path,
    fault: Fault,
    primary_fake: FakeUpstream,
    backup_fake: FakeUpstream,
    **overrides: Any,
) -> str:
    """What the same fault did with continuation and hedging off (the behaviour before
    issue 16), from a real run: not asserted, recorded for the table."""
    stage(fault, primary_fake, backup_fake)
    values = {**overrides, **dict(fault.settings)}
    values.update(enable_stream_continuation=False, enable_hedging=False)
    with gateway(tmp_path / "before", backup_fake, enable_circuit_breaker=True, **values) as app:
        with app.client() as client:
            _, raw = post_stream(client, {"message": "hi", "conversationId": "c-0"})
        counted = breaker_failures(app.services, "primary")
    events = sse_events(raw)
    counts = upstream_counts(primary_fake, backup_fake)
    complete = "complete" if events[-1]["type"] == "done" else "cut"
    upstream = " · ".join(f"{model} {n}" for model, n in counts.items())
    return f"{compact_events(events)} ({complete}; {upstream}; counted {int(counted)})"


def run_fault(
    tmp_path: Path,
    fault: Fault,
    primary_fake: FakeUpstream,
    backup_fake: FakeUpstream,
    route_label: str,
    **overrides: Any,
) -> None:
    """Run one fault through the stream route; `backup_fake` serves the OpenAI provider."""
    before = fault.before
    if fault.compare:
        before = before_status(tmp_path, fault, primary_fake, backup_fake, **overrides)
    stage(fault, primary_fake, backup_fake)
    values = {**overrides, **dict(fault.settings)}
    with gateway(tmp_path, backup_fake, enable_circuit_breaker=True, **values) as app:
        with app.client() as client:
            response, raw = post_stream(client, {"message": "hi", "conversationId": "c-1"})
            stored = client.get("/api/conversations/c-1")
        counted = breaker_failures(app.services, "primary")
    counts = upstream_counts(primary_fake, backup_fake)
    requests = (counts["primary"], counts["backup"])
    prefilled = tuple(
        sum(p is not None for f in {primary_fake, backup_fake} for p in f.prefills_for(model))
        for model in MODELS
    )

    assert response.status_code == 200, raw
    events = sse_events(raw)
    check_sse_contract(events)
    last = events[-1]
    text = streamed_text(events)
    if fault.outcome == "done":
        assert last["type"] == "done"
        expected = fault.expected_text()
        # Exactly the canonical answer: nothing duplicated, nothing spliced.
        assert text == last["content"] == expected
        assert last["model"] == fault.model
        assert last["fallbackUsed"] is (fault.model != "primary")
        if fault.usage is not None:
            assert last["usage"] == {
                "inputTokens": fault.usage[0],
                "outputTokens": fault.usage[1],
                "totalTokens": sum(fault.usage),
            }
        else:
            # What was billed: only the attempt that finished reported usage (a cut stream's
            # usage never arrives), so continuing does not inflate it.
            assert last["usage"] == {"inputTokens": 12, "outputTokens": 7, "totalTokens": 19}
        # A complete streamed turn is stored once, answer and model included.
        assert stored.status_code == 200
        messages = stored.json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[1]["content"] == expected and messages[1]["model"] == fault.model
    else:
        assert last["type"] == "error"
        assert last["code"] == fault.outcome
        assert last["recoverable"] is fault.recoverable
        assert not any(event["type"] == "done" for event in events)
        # Exactly the text of the chunks the upstream sent before the fault, however grouped.
        sent_before = Behaviour(text=PRIMARY_TEXT).text_chunks()[: fault.chunks or 0]
        assert text == "".join(sent_before)
        if fault.chunks:  # the client has a prefix of the primary's answer, flagged as cut
            assert PRIMARY_TEXT.startswith(text)
            assert "primary" in last["error"]
        # A cut turn is not stored: no half answer in the history.
        assert stored.status_code == 404
    assert requests == fault.requests
    assert prefilled == fault.prefills  # never a prefill to a model not declared able
    assert counted == fault.counted

    complete = "yes" if last["type"] == "done" else ("no" if text else "—")
    model = last.get("model", "—") if last["type"] == "done" else "—"
    if last["type"] == "error" and text:
        model = "primary (cut)"
    elif fault.first_model() != fault.model and last["type"] == "done":
        model = f"{fault.first_model()} → {model}"
    note = f"primary breaker counted {int(counted)}"
    note += "; stored" if stored.status_code == 200 else "; not stored"
    if any(prefilled):
        note += f"; prefills received: primary {prefilled[0]}, backup {prefilled[1]}"
    record(
        FaultRow(
            fault=fault.name,
            route=route_label,
            status=response.status_code,
            events=compact_events(events),
            complete=complete,
            model=model,
            upstream=counts,
            note=note,
            before=before,
        )
    )


@pytest.mark.parametrize("fault", OPENAI_FAULTS, ids=[f.id for f in OPENAI_FAULTS])
def test_fault_matrix_openai_upstream(
    tmp_path: Path, openai_fake: FakeOpenAI, fault: Fault
) -> None:
    run_fault(tmp_path, fault, openai_fake, openai_fake, ROUTE)


# The same commit-point rules on Bedrock's binary eventstream: `bedrock/primary` falls back to
# `openai/backup`, so both wire formats and a cross-provider fallback are exercised.
BEDROCK_FAULTS = [
    Fault(
        "Bedrock 503 `ServiceUnavailableException` persistent",
        persistent=Behaviour(status=503),
        model="backup",
        requests=(4, 1),
        counted=4,
        id="503-persistent",
    ),
    Fault(
        "Bedrock 429 `ThrottlingException` once",
        script=(Behaviour(status=429),),
        requests=(2, 0),
        counted=1,
        id="throttled-once",
    ),
    Fault(
        "Bedrock slow first token",
        persistent=Behaviour(text=PRIMARY_TEXT, first_byte_delay_s=30),
        model="backup",
        requests=(1, 1),
        counted=1,
        id="slow-first-token",
    ),
    Fault(
        "Bedrock cut mid-stream (after 2 chunks), once: same model continues (restart)",
        script=(Behaviour(text=PRIMARY_TEXT, cut_after=2),),
        requests=(2, 0),
        counted=1,
        compare=True,
        id="cut-mid-stream",
    ),
    Fault(
        "Bedrock stall mid-stream (after 2 chunks), once",
        script=(Behaviour(text=PRIMARY_TEXT, stall_after=2),),
        requests=(2, 0),
        counted=1,
        compare=True,
        id="stall-mid-stream",
    ),
    Fault(
        "Bedrock frame with a bad CRC (after 2 chunks), once",
        script=(Behaviour(text=PRIMARY_TEXT, malformed_after=2),),
        requests=(2, 0),
        counted=1,
        compare=True,
        id="bad-crc",
    ),
    Fault(
        "Bedrock `modelStreamErrorException` frame (after 2 chunks), once",
        script=(Behaviour(text=PRIMARY_TEXT, stream_error_after=2),),
        requests=(2, 0),
        counted=1,
        compare=True,
        id="in-stream-exception",
    ),
    Fault(
        "Bedrock missing `messageStop`, once",
        script=(Behaviour(text=PRIMARY_TEXT, missing_terminator=True),),
        requests=(2, 0),
        counted=1,
        compare=True,
        id="missing-terminator",
    ),
    Fault(
        "Bedrock `messageStop` without the `metadata` frame (clean end)",
        persistent=Behaviour(text=PRIMARY_TEXT, omit_done=True),
        usage=(0, 0),
        before="same (already complete after `messageStop`)",
        id="no-metadata",
    ),
    Fault(
        "Bedrock model declared prefill-capable (`PREFILL_MODELS`), cut once: prefill continuation",
        script=(Behaviour(text=PRIMARY_TEXT, cut_after=2),),
        requests=(2, 0),
        prefills=(1, 0),
        counted=1,
        settings=(("prefill_models", "bedrock/primary"),),
        compare=True,
        id="prefill-same-model",
    ),
    Fault(
        "Bedrock cut every time; OpenAI fallback with the same answer continues (restart)",
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
        "Bedrock cut every time; the OpenAI fallback's answer diverges",
        persistent=Behaviour(text=PRIMARY_TEXT, cut_after=2),
        outcome="STREAM_INTERRUPTED",
        chunks=2,
        requests=(2, 1),
        counted=2,
        compare=True,
        id="cut-fallback-diverges",
    ),
    Fault(
        "Bedrock silent, hedge after 0.5 s: the OpenAI hedge wins",
        persistent=Behaviour(delay_s=30),
        model="backup",
        requests=(1, 1),
        settings=(("hedge_delay_s", 0.5), ("first_token_timeout_s", 3.0)),
        compare=True,
        id="silent-primary-hedged",
    ),
    Fault(
        "Bedrock input too long (400 `ValidationException`)",
        persistent=Behaviour(
            status=400, message="Input is too long for requested model.", error_type=None
        ),
        model="backup",
        requests=(1, 1),
        id="context-length",
    ),
]


@pytest.mark.parametrize("fault", BEDROCK_FAULTS, ids=[f.id for f in BEDROCK_FAULTS])
def test_fault_matrix_bedrock_primary_openai_backup(
    tmp_path: Path,
    bedrock_fake: FakeBedrock,
    openai_fake: FakeOpenAI,
    aws_env: None,
    fault: Fault,
) -> None:
    run_fault(
        tmp_path,
        fault,
        bedrock_fake,
        openai_fake,
        ROUTE + " (Bedrock → OpenAI)",
        model_chain="bedrock/primary,openai/backup",
        bedrock_endpoint_url=bedrock_fake.url,
        aws_region="us-east-1",
    )


def test_a_silent_provider_is_left_at_the_attempt_timeout_not_retried(
    tmp_path: Path, openai_fake: FakeOpenAI
) -> None:
    """With FIRST_TOKEN_TIMEOUT_S above ATTEMPT_TIMEOUT_S the attempt timeout is the one that
    fires: the silent model is left for the next one after one request, not retried."""
    prime(openai_fake)
    openai_fake.model_defaults["primary"] = Behaviour(delay_s=30)
    limits = {"first_token_timeout_s": 5, "attempt_timeout_s": 0.5}
    with gateway(tmp_path, openai_fake, **limits) as app, app.client() as client:
        _, raw = post_stream(client, {"message": "hi"})
    done = sse_events(raw)[-1]
    assert done["type"] == "done" and done["model"] == "backup"
    assert upstream_counts(openai_fake) == {"primary": 1, "backup": 1}


# --------------------------------------------------------------------------- storage


def test_a_cut_turn_leaves_no_trace_in_the_history(tmp_path: Path, openai_fake: FakeOpenAI) -> None:
    prime(openai_fake)
    with gateway(tmp_path, openai_fake) as app, app.client() as client:
        _, raw = post_stream(client, {"message": "first question", "conversationId": "h-1"})
        assert sse_events(raw)[-1]["type"] == "done"

        # Cut, and cut again on the restart; the backup's answer diverges: nobody can finish.
        cut = Behaviour(text=PRIMARY_TEXT, cut_after=3)
        openai_fake.script([cut, cut], model="primary")
        _, raw = post_stream(client, {"message": "second question", "conversationId": "h-1"})
        events = sse_events(raw)
        assert events[-1]["type"] == "error" and streamed_text(events)

        history = client.get("/api/conversations/h-1").json()["messages"]
        assert [m["content"] for m in history] == ["first question", PRIMARY_TEXT]

        # The next turn's prompt carries the stored history only: no half answer, and not
        # the unanswered question either.
        post_stream(client, {"message": "third question", "conversationId": "h-1"})
        sent = openai_fake.requests_for("primary")[-1].json["messages"]
        assert [m["content"] for m in sent] == ["first question", PRIMARY_TEXT, "third question"]


def test_a_continued_turn_is_stored_once_and_complete(
    tmp_path: Path, openai_fake: FakeOpenAI
) -> None:
    prime(openai_fake)
    openai_fake.script(Behaviour(text=PRIMARY_TEXT, cut_after=3), model="primary")
    with gateway(tmp_path, openai_fake) as app, app.client() as client:
        _, raw = post_stream(client, {"message": "question", "conversationId": "k-1"})
        assert sse_events(raw)[-1]["type"] == "done"
        history = client.get("/api/conversations/k-1").json()["messages"]
        assert [m["content"] for m in history] == ["question", PRIMARY_TEXT]
        post_stream(client, {"message": "next", "conversationId": "k-1"})
    sent = openai_fake.requests_for("primary")[-1].json["messages"]
    assert [m["content"] for m in sent] == ["question", PRIMARY_TEXT, "next"]


# --------------------------------------------------------------------------- tools in a stream


def test_a_streamed_turn_with_a_tool_round_trip(tmp_path: Path, openai_fake: FakeOpenAI) -> None:
    prime(openai_fake)
    openai_fake.script(
        [
            Behaviour(text="", tool_calls=(ToolCall("calcular", {"expressao": "6 * 7"}),)),
            Behaviour(text="The answer is 42."),
        ],
        model="primary",
    )
    with gateway(tmp_path, openai_fake) as app, app.client() as client:
        _, raw = post_stream(client, {"message": "what is 6 * 7?", "conversationId": "t-1"})
        history = client.get("/api/conversations/t-1").json()["messages"]
    events = sse_events(raw)
    check_sse_contract(events)
    done = events[-1]
    assert done["type"] == "done" and done["content"] == "The answer is 42."
    assert done["toolsUsed"] == [{"name": "calcular", "input": {"expressao": "6 * 7"}, "ok": True}]
    # The second model call carried the tool result back in OpenAI's shape.
    second = openai_fake.requests_for("primary")[1].json["messages"]
    assert second[-2]["tool_calls"][0]["function"]["name"] == "calcular"
    assert second[-1]["role"] == "tool" and "42" in second[-1]["content"]
    assert len(history) == 4  # user, assistant tool call, tool result, answer


# --------------------------------------------------------------------------- slots, disconnects


def test_a_stream_holds_its_slot_until_the_client_leaves(
    tmp_path: Path, openai_fake: FakeOpenAI
) -> None:
    prime(openai_fake)
    openai_fake.model_defaults["primary"] = Behaviour(text=PRIMARY_TEXT, stall_after=2)
    settings = {
        "enable_bottleneck": True,
        "max_concurrent": 1,
        "max_queue": 0,
        "enable_circuit_breaker": True,
        # The stall must not end the stream by itself.
        "stream_idle_timeout_s": 60,
        "attempt_timeout_s": 60,
    }
    with gateway(tmp_path, openai_fake, **settings) as app, app.client() as client:
        bottleneck = app.services.bottleneck
        with client.stream(
            "POST", ROUTE, json={"message": "hi", "conversationId": "d-1"}
        ) as response:
            reader = EventReader(response)  # kept: dropping it would disconnect
            seen = reader.until(lambda e: e.get("chunkIndex") == 0)
            assert [e["type"] for e in seen] == ["connected", "chunk"]
            # Mid-stream the slot is still held: the next request finds no room.
            assert bottleneck.running == 1
            assert openai_fake.in_flight == 1
            refused = httpx.post(app.url + ROUTE, json={"message": "me too"}, timeout=10)
            assert refused.status_code == 503 and refused.json()["code"] == "QUEUE_FULL"
        # The client went away: the upstream call is cancelled and the slot freed.
        wait_until(lambda: bottleneck.running == 0 and openai_fake.in_flight == 0)
        assert openai_fake.cancelled == 1
        assert breaker_failures(app.services, "primary") == 0  # our client left, not a fault
        assert client.get("/api/conversations/d-1").status_code == 404

        # And the next stream gets the slot and completes.
        openai_fake.model_defaults["primary"] = Behaviour(text=PRIMARY_TEXT)
        response, raw = post_stream(client, {"message": "again"})
        assert sse_events(raw)[-1]["type"] == "done"
        assert bottleneck.running == 0


def test_a_client_leaving_before_the_first_token_cancels_the_upstream(
    tmp_path: Path, openai_fake: FakeOpenAI
) -> None:
    prime(openai_fake)
    openai_fake.model_defaults["primary"] = Behaviour(delay_s=60)  # silent
    settings = {
        "enable_bottleneck": True,
        "max_concurrent": 1,
        "first_token_timeout_s": 60,
        "attempt_timeout_s": 60,
    }
    with gateway(tmp_path, openai_fake, **settings) as app, app.client() as client:
        with client.stream("POST", ROUTE, json={"message": "hi"}) as response:
            reader = EventReader(response)
            seen = reader.until(lambda e: e["type"] == "connected")
            assert seen[0]["type"] == "connected"
            wait_until(lambda: openai_fake.in_flight == 1)
            assert app.services.bottleneck.running == 1
        wait_until(lambda: app.services.bottleneck.running == 0 and openai_fake.in_flight == 0)
        assert openai_fake.cancelled == 1
        assert len(openai_fake.requests_for("backup")) == 0  # no fallback for a gone client


class EventReader:
    """Our SSE events from a live response, read as far as a test needs. It holds one raw
    iterator for the whole response: dropping an httpx iterator early closes the connection,
    which is exactly the client disconnect some tests want to cause only later."""

    def __init__(self, response: httpx.Response) -> None:
        self._raw = response.iter_raw()
        self._buffer = b""
        self.events: list[dict[str, Any]] = []

    def until(self, condition: Any) -> list[dict[str, Any]]:
        while not (self.events and condition(self.events[-1])):
            try:
                self._buffer += next(self._raw)
            except StopIteration:
                raise AssertionError(f"stream ended first: {self.events}") from None
            *complete, self._buffer = self._buffer.split(b"\n\n")
            for block in complete:
                self.events.extend(sse_events(block + b"\n\n"))
        return self.events


# --------------------------------------------------------------------------- a flapping primary


def run_outage(tmp_path: Path, fake: FakeOpenAI, *, breaker: bool) -> dict[str, Any]:
    """The primary goes down for 10 streamed requests, stays down for one more after the
    breaker's cooldown, then recovers for 3. Every request is answered; returns what the
    primary received in each phase."""
    prime(fake)
    fake.model_defaults["primary"] = Behaviour(status=503)
    settings = {
        "enable_circuit_breaker": breaker,
        "circuit_breaker_threshold": 3,
        "circuit_breaker_cooldown_s": 3600,
    }
    phases: dict[str, Any] = {}
    with gateway(tmp_path, fake, **settings) as app, app.client() as client:
        flags, breakers = app.services.flags, app.services.breakers

        def ask(n: int) -> list[str]:
            models = []
            for _ in range(n):
                _, raw = post_stream(client, {"message": "hi"})
                done = sse_events(raw)[-1]
                assert done["type"] == "done", done
                models.append(done["model"])
            return models

        def cool_down() -> None:
            # Let the cooldown pass (a runtime flag change, as an operator would), then put it
            # back, so nothing below depends on how fast the requests run.
            if breaker:
                flags.set({"circuit_breaker_cooldown_s": 0.01})
                wait_until(lambda: breakers.get("primary").state.value == "HALF_OPEN")
                flags.set({"circuit_breaker_cooldown_s": 3600})

        before = len(fake.requests_for("primary"))
        phases["down"] = (ask(10), len(fake.requests_for("primary")) - before)
        phases["state_down"] = breakers.get("primary").state.value
        cool_down()
        before = len(fake.requests_for("primary"))
        phases["probe_fails"] = (ask(1), len(fake.requests_for("primary")) - before)
        phases["state_probe"] = breakers.get("primary").state.value
        fake.model_defaults["primary"] = Behaviour(text=PRIMARY_TEXT)
        cool_down()
        before = len(fake.requests_for("primary"))
        phases["recovered"] = (ask(3), len(fake.requests_for("primary")) - before)
        phases["state_end"] = breakers.get("primary").state.value
    return phases


def test_a_flapping_primary_is_not_hammered_once_its_breaker_opens(
    tmp_path: Path, openai_fake: FakeOpenAI
) -> None:
    on = run_outage(tmp_path / "on", openai_fake, breaker=True)
    backup_on = len(openai_fake.requests_for("backup"))
    off = run_outage(tmp_path / "off", openai_fake, breaker=False)
    backup_off = len(openai_fake.requests_for("backup"))

    # Breaker on: 3 failures open it (all in the first request's retries); the next 9
    # requests never touch the primary; one probe after the cooldown fails and re-opens it;
    # after recovery one probe closes it and traffic returns to the primary.
    assert on["down"] == (["backup"] * 10, 3)
    assert on["state_down"] == "OPEN"
    assert on["probe_fails"] == (["backup"], 1)
    assert on["state_probe"] == "OPEN"
    assert on["recovered"] == (["primary"] * 3, 3)
    assert on["state_end"] == "CLOSED"

    # Breaker off: every request still tries the dead primary first; only the retry budget
    # (3 retries per 10 s at this traffic) keeps it from being 4 calls each.
    assert off["down"] == (["backup"] * 10, 13)
    assert off["probe_fails"] == (["backup"], 1)
    assert off["recovered"] == (["primary"] * 3, 3)

    for label, phases, backup in (("on", on, backup_on), ("off", off, backup_off)):
        received = sum(phases[p][1] for p in ("down", "probe_fails", "recovered"))
        record(
            FaultRow(
                fault=f"primary down for 11 requests, then back (breaker {label})",
                route=ROUTE,
                status=200,
                events="14 × (connected, chunk…, done)",
                complete="yes (all 14)",
                model="backup ×11, then primary ×3",
                upstream={"primary": received, "backup": backup},
                note=(
                    f"primary calls while down: {phases['down'][1]} for 10 requests, "
                    f"{phases['probe_fails'][1]} for the next"
                    + (" (the half-open probe)" if label == "on" else "")
                ),
            )
        )


# --------------------------------------------------------------------------- hedge budget


def test_hedges_stop_when_their_budget_is_spent(tmp_path: Path, openai_fake: FakeOpenAI) -> None:
    """A slow (but healthy) primary and a 0.1 s hedge delay: every request would be hedged,
    but the budget (ratio 0: only its floor of 3 per 10 s) lets 3 through; the rest wait
    for the slow primary, so a slow provider cannot double the upstream load."""
    prime(openai_fake)
    openai_fake.model_defaults["primary"] = Behaviour(text=PRIMARY_TEXT, first_byte_delay_s=0.5)
    openai_fake.model_defaults["backup"] = Behaviour(text=BACKUP_TEXT)
    settings = {
        "enable_circuit_breaker": True,
        "hedge_delay_s": 0.1,
        "hedge_budget_ratio": 0.0,
        "first_token_timeout_s": 5.0,
        "attempt_timeout_s": 5.0,
    }
    models = []
    with gateway(tmp_path, openai_fake, **settings) as app, app.client() as client:
        for _ in range(5):
            _, raw = post_stream(client, {"message": "hi"})
            done = sse_events(raw)[-1]
            assert done["type"] == "done", done
            models.append(done["model"])
        hedge = app.services.metrics.registry.get_sample_value
        started = hedge(
            "hedge_total", {"operation": "converse", "model": "primary", "outcome": "started"}
        )
        refused = hedge(
            "hedge_total",
            {"operation": "converse", "model": "primary", "outcome": "budget_exhausted"},
        )
        counted = breaker_failures(app.services, "primary")
    assert counted == 0  # the cancelled losers are ignored by the breaker
    assert models == ["backup"] * 3 + ["primary"] * 2
    assert (started, refused) == (3, 2)
    counts = upstream_counts(openai_fake)
    assert counts == {"primary": 5, "backup": 3}
    record(
        FaultRow(
            fault="slow primary (0.5 s to first token), hedge delay 0.1 s, hedge budget at "
            "its floor (3 per 10 s): 5 requests",
            route=ROUTE,
            status=200,
            events="5 × (connected, chunk…, done)",
            complete="yes (all 5)",
            model="backup ×3 (hedge won), then primary ×2 (budget exhausted: no hedge)",
            upstream=counts,
            note="hedges started 3, refused by the budget 2; the 3 primaries that lost were "
            "cancelled and not counted by the breaker",
            before="no hedging: all 5 answered by the primary after 0.5 s (not re-run)",
        )
    )
