"""`/v1/chat/completions` and `/v1/models` with the official `openai` SDK as the client.

The facade goes through the same admission, fallback, retry and breaker as `/api/chat`, against
a fake OpenAI-compatible upstream on loopback. Before the first chunk a failure is still an HTTP
error in OpenAI's shape, so the SDK raises its usual `APIStatusError` subclass from `create()`;
after it, an error chunk ends the stream without `[DONE]`, so the SDK raises `APIError` while
iterating — a cut answer never ends like a complete one.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.fakes import Behaviour, ToolCall
from tests.fakes.openai_server import FakeOpenAI
from tests.gates import wait_until
from tests.stream_harness import (
    BACKUP_TEXT,
    CLIENT_OUTCOMES,
    MODELS,
    OPENAI_CODES,
    OPENAI_FAULTS,
    PRIMARY_TEXT,
    Fault,
    FaultRow,
    breaker_failures,
    dump_rows,
    gateway,
    parse_sse,
    prime,
    record,
    threaded_fake,
    upstream_counts,
)

ROUTE = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module", autouse=True)
def _fault_table() -> Iterator[None]:
    yield
    dump_rows()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with threaded_fake(FakeOpenAI) as upstream:
        yield upstream


class RecordingTransport(httpx.HTTPTransport):
    """Reads each response body whole and keeps it before the SDK sees it, so a test can
    check the exact bytes (`[DONE]` or not) even where the SDK stops reading early."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        try:
            body = b"".join(response.stream)  # type: ignore[union-attr]
        finally:
            response.close()
        self.bodies.append(body)
        headers = [(k, v) for k, v in response.headers.items() if k != "transfer-encoding"]
        return httpx.Response(response.status_code, headers=headers, content=body)


def sdk(url: str, transport: httpx.BaseTransport | None = None) -> openai.OpenAI:
    http_client = httpx.Client(transport=transport, timeout=30)
    return openai.OpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=0, http_client=http_client
    )


def raw_chunks(body: bytes) -> list[Any]:
    """The facade's SSE payloads: JSON objects, and the literal `[DONE]`."""
    return [p.decode() if p == b"[DONE]" else orjson.loads(p) for p in parse_sse(body)]


# --------------------------------------------------------------------------- happy paths


def test_models_lists_the_configured_chain(tmp_path: Path, fake: FakeOpenAI) -> None:
    prime(fake)
    with gateway(tmp_path, fake) as app:
        client = sdk(app.url)
        models = client.models.list()
        one = client.models.retrieve("backup")
        qualified = client.models.retrieve("openai/primary")
        with pytest.raises(openai.NotFoundError) as caught:
            client.models.retrieve("gpt-17")
    assert [m.id for m in models.data] == ["primary", "backup"]
    assert {m.owned_by for m in models.data} == {"openai"}
    assert (one.id, one.owned_by, qualified.id) == ("backup", "openai", "primary")
    assert caught.value.code == "model_not_found"
    assert fake.request_count == 0  # answered from configuration


def test_v1_routes_answer_in_openai_shape_and_are_guarded(tmp_path: Path, fake: FakeOpenAI) -> None:
    """Unknown /v1 routes, wrong methods, and API_KEYS on every /v1 route, models included."""
    prime(fake)
    with gateway(tmp_path, fake, api_keys="k-1") as app:
        denied = sdk(app.url)  # api_key "unused"
        with pytest.raises(openai.AuthenticationError):
            denied.models.list()
        with pytest.raises(openai.AuthenticationError):
            denied.models.retrieve("primary")
        with pytest.raises(openai.AuthenticationError):
            denied.responses.create(model="primary", input="x")
        allowed = openai.OpenAI(base_url=app.url + "/v1", api_key="k-1", max_retries=0)
        assert [m.id for m in allowed.models.list().data] == ["primary", "backup"]
        with app.client() as http:
            unknown = http.get("/v1/embeddings-of-nothing", headers={"Authorization": "Bearer k-1"})
            wrong = http.get("/v1/chat/completions", headers={"Authorization": "Bearer k-1"})
    assert unknown.status_code == 404 and "error" in unknown.json()
    assert isinstance(unknown.json()["error"], dict)  # OpenAI's shape, not the SPEC's string
    assert wrong.status_code == 405 and isinstance(wrong.json()["error"], dict)


def test_a_plain_completion(tmp_path: Path, fake: FakeOpenAI) -> None:
    prime(fake)
    with gateway(tmp_path, fake) as app:
        completion = sdk(app.url).chat.completions.create(
            model="primary",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
            ],
            temperature=0.5,
            max_tokens=64,
        )
    assert completion.object == "chat.completion"
    assert completion.model == "primary"
    choice = completion.choices[0]
    assert choice.message.content == PRIMARY_TEXT and choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (12, 7)
    assert completion.usage.total_tokens == 19
    sent = fake.requests_for("primary")[0].json
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert (sent["temperature"], sent["max_tokens"]) == (0.5, 64)


def test_a_streamed_completion_with_usage(tmp_path: Path, fake: FakeOpenAI) -> None:
    prime(fake)
    recorder = RecordingTransport()
    with gateway(tmp_path, fake) as app:
        stream = sdk(app.url, recorder).chat.completions.create(
            model="primary",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == PRIMARY_TEXT
    assert {c.model for c in chunks} == {"primary"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    # include_usage: one last chunk with no choices and the usage.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 19
    assert all(c.usage is None for c in chunks[:-1])
    assert raw_chunks(recorder.bodies[0])[-1] == "[DONE]"


def test_without_include_usage_no_usage_chunk(tmp_path: Path, fake: FakeOpenAI) -> None:
    prime(fake)
    with gateway(tmp_path, fake) as app:
        chunks = list(
            sdk(app.url).chat.completions.create(model="primary", messages=HELLO, stream=True)
        )
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


# --------------------------------------------------------------------------- the fault matrix


def expected_text(fault: Fault) -> str:
    return PRIMARY_TEXT if fault.model == "primary" else BACKUP_TEXT


def committed_error(fault: Fault) -> bool:
    """The fault strikes after the first chunk: an error chunk, not an HTTP error."""
    return fault.outcome != "done" and bool(fault.chunks)


def sdk_stream(
    tmp_path: Path, fake: FakeOpenAI, fault: Fault, **settings: Any
) -> tuple[list[str], set[str], openai.APIError | None, float, bytes]:
    """One streamed completion through the SDK with `fault` staged: the text received, the
    models named by the chunks, what the SDK raised, the primary's counted failures, and
    the raw body."""
    prime(fake)
    if fault.script:
        fake.script(fault.script, model="primary")
    if fault.persistent is not None:
        fake.model_defaults["primary"] = fault.persistent
    if fault.backup is not None:
        fake.model_defaults["backup"] = fault.backup
    recorder = RecordingTransport()
    received: list[str] = []
    models: set[str] = set()
    raised: openai.APIError | None = None
    with gateway(tmp_path, fake, enable_circuit_breaker=True, **settings) as app:
        client = sdk(app.url, recorder)
        try:
            stream = client.chat.completions.create(model="primary", messages=HELLO, stream=True)
            for chunk in stream:
                models.add(chunk.model)
                if chunk.choices and chunk.choices[0].delta.content:
                    received.append(chunk.choices[0].delta.content)
        except openai.APIError as exc:
            raised = exc
        counted = breaker_failures(app.services, "primary")
    return received, models, raised, counted, recorder.bodies[0]


@pytest.mark.parametrize("fault", OPENAI_FAULTS, ids=[f.id for f in OPENAI_FAULTS])
def test_fault_matrix_streaming_with_the_sdk(
    tmp_path: Path, fake: FakeOpenAI, fault: Fault
) -> None:
    before = fault.before
    if fault.compare:  # the same fault with continuation and hedging off, recorded
        off = {"enable_stream_continuation": False, "enable_hedging": False}
        got, _, raised, counted, _ = sdk_stream(
            tmp_path / "before", fake, fault, **{**dict(fault.settings), **off}
        )
        counts = upstream_counts(fake)
        end = "`[DONE]` (complete)" if raised is None else f"SDK `{type(raised).__name__}` (cut)"
        upstream = " · ".join(f"{model} {n}" for model, n in counts.items())
        before = f"chunk×{len(got)}, {end}; {upstream}; counted {int(counted)}"
    received, models, raised, counted, body = sdk_stream(
        tmp_path, fake, fault, **dict(fault.settings)
    )
    counts = upstream_counts(fake)
    text = "".join(received)

    prefilled = tuple(sum(p is not None for p in fake.prefills_for(m)) for m in MODELS)
    if fault.outcome == "done":
        assert raised is None
        assert text == fault.expected_text()  # nothing duplicated, nothing spliced
        # One completion, one model: the one whose first chunk committed the stream.
        assert models == {fault.first_model()}
        assert raw_chunks(body)[-1] == "[DONE]"
        saw = f"role, chunk×{len(received)}, finish `stop`, `[DONE]`"
        sdk_saw = "iterates to the end"
    elif committed_error(fault):
        # The SDK raises while iterating, after the part of the answer that came through.
        assert raised is not None and not isinstance(raised, openai.APIStatusError)
        kind = "invalid_request_error" if fault.outcome in CLIENT_OUTCOMES else "server_error"
        assert raised.code == fault.outcome and raised.type == kind
        # Exactly the text sent before the fault (chunks that arrived together travel together).
        assert text == "".join(Behaviour(text=PRIMARY_TEXT).text_chunks()[: fault.chunks])
        chunks = raw_chunks(body)
        assert "[DONE]" not in chunks
        assert chunks[-1]["error"]["code"] == fault.outcome
        assert not any(c["choices"][0].get("finish_reason") for c in chunks[1:-1])
        saw = f"role, chunk×{len(received)}, error chunk {fault.outcome}, no `[DONE]`"
        sdk_saw = "`APIError` while iterating"
    else:
        # Nothing was streamed: a plain HTTP error the SDK raises from create().
        assert isinstance(raised, openai.APIStatusError)
        status = 400 if fault.outcome in CLIENT_OUTCOMES else 502
        assert raised.status_code == status
        code = OPENAI_CODES.get(fault.outcome, fault.outcome)
        assert isinstance(raised.body, dict) and raised.body["code"] == code
        assert received == []
        name = type(raised).__name__
        saw = f"JSON error {fault.outcome}, no stream"
        sdk_saw = f"`{name}` from create()"
    assert (counts["primary"], counts["backup"]) == fault.requests
    assert prefilled == fault.prefills
    assert counted == fault.counted

    if fault.outcome == "done":
        complete, model = "yes", fault.model or "—"
        if fault.first_model() != fault.model:
            model = f"{fault.first_model()} → {model}"
    else:
        complete = "no" if text else "—"
        model = "primary (cut)" if text else "—"
    record(
        FaultRow(
            fault=fault.name,
            route=ROUTE + " stream (SDK)",
            status=recorder_status(body),
            events=f"{saw} — SDK: {sdk_saw}",
            complete=complete,
            model=model,
            upstream=counts,
            note=f"primary breaker counted {int(counted)}"
            + (f"; prefills received: backup {prefilled[1]}" if any(prefilled) else ""),
            before=before,
        )
    )


def recorder_status(body: bytes) -> int:
    return 200 if body.startswith(b"data: ") else json.loads(body)["status"]


# Non-streaming: a body cut or corrupted before it is whole is retried like any transient
# failure (nothing reached the client yet), a silent model is left at ATTEMPT_TIMEOUT_S.
PLAIN_FAULTS = [
    Fault(
        "503 persistent",
        persistent=Behaviour(status=503),
        model="backup",
        requests=(4, 1),
        counted=4,
        id="503-persistent",
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
        "body cut half-way, once",
        script=(Behaviour(text=PRIMARY_TEXT, cut_after=1),),
        requests=(2, 0),
        counted=1,
        id="cut-once",
    ),
    Fault(
        "malformed JSON body, once",
        script=(Behaviour(text=PRIMARY_TEXT, malformed_after=1),),
        requests=(2, 0),
        counted=1,
        id="malformed-once",
    ),
    Fault(
        "context length exceeded (400 `context_length_exceeded`)",
        persistent=Behaviour(status=400, error_type="context_length_exceeded"),
        model="backup",
        requests=(1, 1),
        id="context-length",
    ),
    Fault(
        "invalid request (400 `invalid_request_error`)",
        persistent=Behaviour(status=400, message="'temperature' must be at most 2"),
        outcome="INVALID_REQUEST",
        model=None,
        id="invalid-request",
    ),
    Fault(
        "context length exceeded on every model of the chain",
        persistent=Behaviour(status=400, error_type="context_length_exceeded"),
        backup=Behaviour(status=400, error_type="context_length_exceeded"),
        outcome="CONTEXT_LENGTH_EXCEEDED",
        model=None,
        requests=(1, 1),
        id="context-length-everywhere",
    ),
    Fault(
        "content filter on the prompt (400 `content_filter`)",
        persistent=Behaviour(status=400, error_type="content_filter"),
        outcome="CONTENT_FILTERED",
        model=None,
        id="content-filter-prompt",
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


@pytest.mark.parametrize("fault", PLAIN_FAULTS, ids=[f.id for f in PLAIN_FAULTS])
def test_fault_matrix_plain_completions_with_the_sdk(
    tmp_path: Path, fake: FakeOpenAI, fault: Fault
) -> None:
    prime(fake)
    if fault.script:
        fake.script(fault.script, model="primary")
    if fault.persistent is not None:
        fake.model_defaults["primary"] = fault.persistent
    if fault.backup is not None:
        fake.model_defaults["backup"] = fault.backup
    with gateway(tmp_path, fake, enable_circuit_breaker=True) as app:
        client = sdk(app.url)
        if fault.outcome == "done":
            completion = client.chat.completions.create(model="primary", messages=HELLO)
            assert completion.choices[0].message.content == expected_text(fault)
            assert completion.model == fault.model
            status, saw = 200, "`chat.completion`"
        else:
            expected: type[openai.APIStatusError] = openai.InternalServerError
            if fault.outcome in CLIENT_OUTCOMES:
                expected = openai.BadRequestError
            with pytest.raises(expected) as caught:
                client.chat.completions.create(model="primary", messages=HELLO)
            error = caught.value
            status = error.status_code
            assert status == (400 if fault.outcome in CLIENT_OUTCOMES else 502)
            code = OPENAI_CODES.get(fault.outcome, fault.outcome)
            assert isinstance(error.body, dict) and error.body["code"] == code
            if fault.outcome == "UPSTREAM_FAILED":  # the message names each model and why
                assert "primary" in error.body["message"] and "backup" in error.body["message"]
            saw = f"JSON error {fault.outcome} — SDK: `{type(error).__name__}`"
        counted = breaker_failures(app.services, "primary")
    counts = upstream_counts(fake)
    assert (counts["primary"], counts["backup"]) == fault.requests
    assert counted == fault.counted
    record(
        FaultRow(
            fault=fault.name,
            route=ROUTE + " (SDK, not streamed)",
            status=status,
            events=saw,
            complete="yes" if fault.outcome == "done" else "—",
            model=fault.model or "—",
            upstream=counts,
            note=f"primary breaker counted {int(counted)}",
        )
    )


# --------------------------------------------------------------------------- errors in OpenAI shape


def test_bad_requests_raise_bad_request_error(tmp_path: Path, fake: FakeOpenAI) -> None:
    prime(fake)
    with gateway(tmp_path, fake) as app:
        client = sdk(app.url)
        # An unknown model is a 404 `model_not_found`, as OpenAI answers it.
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="gpt-17", messages=HELLO)
        assert caught.value.body == {
            "message": "unknown model 'gpt-17'",
            "type": "not_found_error",
            "param": "model",
            "code": "model_not_found",
        }
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="primary", messages=[], stream=True)
        # Plain HTTP too: a body that is not JSON, in OpenAI's shape plus our status/code.
        response = httpx.post(app.url + ROUTE, content=b"{nope", timeout=10)
    assert response.status_code == 400
    body = response.json()
    assert body["error"]["type"] == "invalid_request_error"
    assert (body["status"], body["code"]) == (400, "INVALID_REQUEST")
    assert fake.request_count == 0


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_every_breaker_open_is_a_503_with_retry_after(
    tmp_path: Path, fake: FakeOpenAI, stream: bool
) -> None:
    prime(fake)
    with gateway(tmp_path, fake, enable_circuit_breaker=True) as app:
        for model in ("primary", "backup"):
            app.services.breakers.force_open(model)
        with pytest.raises(openai.InternalServerError) as caught:
            client = sdk(app.url)
            client.chat.completions.create(model="primary", messages=HELLO, stream=stream)
    error = caught.value
    assert error.status_code == 503
    assert isinstance(error.body, dict) and error.body["code"] == "CIRCUIT_OPEN"
    assert int(error.response.headers["retry-after"]) >= 1
    assert fake.request_count == 0


def test_a_failed_stream_before_its_first_chunk_is_an_http_error(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    """The status line waits for the commit point: an exhausted chain is a 502 response, not
    a 200 whose body is an error."""
    prime(fake)
    fake.model_defaults["primary"] = Behaviour(status=503)
    fake.model_defaults["backup"] = Behaviour(status=503)
    with gateway(tmp_path, fake) as app:
        response = httpx.post(
            app.url + ROUTE, json={"model": "primary", "messages": HELLO, "stream": True}
        )
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "UPSTREAM_FAILED"


# --------------------------------------------------------------------------- tools and fallbacks

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
WEATHER_CALL = ToolCall("get_weather", {"city": "Lisbon"}, id="call_weather_1")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_tool_calls_reach_the_sdk(tmp_path: Path, fake: FakeOpenAI, stream: bool) -> None:
    prime(fake)
    fake.script(Behaviour(text="", tool_calls=(WEATHER_CALL,)), model="primary")
    with gateway(tmp_path, fake) as app:
        client = sdk(app.url)
        kwargs: dict[str, Any] = {"model": "primary", "messages": HELLO, "tools": [WEATHER_TOOL]}
        if stream:
            calls: dict[int, dict[str, str]] = {}
            finish = None
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                choice = chunk.choices[0]
                for delta in choice.delta.tool_calls or ():
                    call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                    call["id"] += delta.id or ""
                    if delta.function is not None:
                        call["name"] += delta.function.name or ""
                        call["arguments"] += delta.function.arguments or ""
                finish = choice.finish_reason or finish
            assert list(calls) == [0]
            got = calls[0]
        else:
            completion = client.chat.completions.create(**kwargs)
            message = completion.choices[0].message
            assert message.content is None
            assert message.tool_calls is not None and len(message.tool_calls) == 1
            call = message.tool_calls[0]
            assert call.type == "function"
            got = {"id": call.id, "name": call.function.name, "arguments": call.function.arguments}
            finish = completion.choices[0].finish_reason
    assert finish == "tool_calls"
    assert got["id"] == "call_weather_1" and got["name"] == "get_weather"
    assert json.loads(got["arguments"]) == {"city": "Lisbon"}
    # The client's tool went upstream as is.
    assert fake.requests_for("primary")[0].json["tools"] == [WEATHER_TOOL]


def test_the_tool_result_goes_back_upstream(tmp_path: Path, fake: FakeOpenAI) -> None:
    prime(fake)
    fake.script(Behaviour(text="It is sunny in Lisbon."), model="primary")
    messages = [
        {"role": "user", "content": "weather in Lisbon?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_weather_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Lisbon"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_weather_1", "content": '{"sky": "sunny"}'},
    ]
    with gateway(tmp_path, fake) as app:
        completion = sdk(app.url).chat.completions.create(
            model="primary",
            messages=messages,  # type: ignore[arg-type]
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
        )
    assert completion.choices[0].message.content == "It is sunny in Lisbon."
    sent = fake.requests_for("primary")[0].json["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_weather_1"
    assert json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Lisbon"}
    assert sent[2] == {
        "role": "tool",
        "tool_call_id": "call_weather_1",
        "content": '{"sky": "sunny"}',
    }


def test_fallbacks_in_the_body_override_the_chain(tmp_path: Path, fake: FakeOpenAI) -> None:
    prime(fake)
    fake.model_defaults["primary"] = Behaviour(status=503)
    fake.model_defaults["spare"] = Behaviour(text="Spare says hello.")
    chain = "openai/primary,openai/backup,openai/spare"
    with gateway(tmp_path, fake, model_chain=chain, enable_retry=False) as app:
        client = sdk(app.url)
        completion = client.chat.completions.create(
            model="primary", messages=HELLO, extra_body={"fallbacks": ["spare"]}
        )
        assert completion.model == "spare"
        assert completion.choices[0].message.content == "Spare says hello."
        # The configured chain otherwise: primary, then backup.
        chunks = list(client.chat.completions.create(model="primary", messages=HELLO, stream=True))
        assert {c.model for c in chunks} == {"backup"}
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="primary", messages=HELLO, extra_body={"fallbacks": ["nope"]}
            )
    assert len(fake.requests_for("primary")) == 2
    assert len(fake.requests_for("spare")) == 1
    assert len(fake.requests_for("backup")) == 1


# --------------------------------------------------------------------------- slots, disconnects


def test_a_stream_holds_its_slot_until_the_client_leaves(tmp_path: Path, fake: FakeOpenAI) -> None:
    prime(fake)
    fake.model_defaults["primary"] = Behaviour(text=PRIMARY_TEXT, stall_after=2)
    settings = {
        "enable_bottleneck": True,
        "max_concurrent": 1,
        "max_queue": 0,
        "stream_idle_timeout_s": 60,
        "attempt_timeout_s": 60,
    }
    body = {"model": "primary", "messages": HELLO, "stream": True}
    with gateway(tmp_path, fake, **settings) as app, app.client() as client:
        bottleneck = app.services.bottleneck
        with client.stream("POST", ROUTE, json=body) as response:
            raw = response.iter_raw()  # kept: dropping it would disconnect
            seen = b""
            while seen.count(b'"content"') < 2:  # the role chunk, then the first text
                seen += next(raw)
            assert bottleneck.running == 1 and fake.in_flight == 1
            refused = sdk(app.url)
            with pytest.raises(openai.InternalServerError) as caught:
                refused.chat.completions.create(model="primary", messages=HELLO)
            assert caught.value.status_code == 503
            assert isinstance(caught.value.body, dict)
            assert caught.value.body["code"] == "QUEUE_FULL"
            assert caught.value.response.headers["retry-after"]
        wait_until(lambda: bottleneck.running == 0 and fake.in_flight == 0)
        assert fake.cancelled == 1
        assert b"[DONE]" not in seen


def test_a_client_leaving_before_the_first_chunk_frees_everything(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    """Headers wait for the first chunk, so a client can give up having received nothing;
    that wait is still watched for the client's disconnect."""
    prime(fake)
    fake.model_defaults["primary"] = Behaviour(delay_s=60)  # silent
    settings = {
        "enable_bottleneck": True,
        "enable_circuit_breaker": True,
        "first_token_timeout_s": 60,
        "attempt_timeout_s": 60,
    }
    body = orjson.dumps({"model": "primary", "messages": HELLO, "stream": True})
    with gateway(tmp_path, fake, **settings) as app:
        port = int(app.url.rsplit(":", 1)[1])
        # A raw socket, so the test decides exactly when the client goes away.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(
                b"POST " + ROUTE.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            wait_until(lambda: fake.in_flight == 1)
            assert app.services.bottleneck.running == 1
            client.setblocking(False)
            with pytest.raises(BlockingIOError):
                client.recv(1)  # not a byte yet, not even the status line
        wait_until(lambda: app.services.bottleneck.running == 0 and fake.in_flight == 0)
        assert fake.cancelled == 1
        assert len(fake.requests_for("backup")) == 0
        assert breaker_failures(app.services, "primary") == 0


def test_a_message_over_the_limit_is_refused_before_any_upstream_call(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    prime(fake)
    with gateway(tmp_path, fake, max_message_chars=10) as app:
        client = sdk(app.url)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="primary", messages=[{"role": "user", "content": "x" * 11}]
            )
        assert "messages[0]: content exceeds 10 characters" in str(caught.value)
        ok = client.chat.completions.create(
            model="primary", messages=[{"role": "user", "content": "x" * 10}]
        )
        assert ok.choices[0].message.content
    assert len(fake.requests_for("primary")) == 1
