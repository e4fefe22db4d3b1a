"""The one OpenAI wire codec: what the facade writes, the provider reads back unchanged."""

from __future__ import annotations

import orjson
import pytest

from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    Message,
    TextBlock,
    TextDelta,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    ToolUseEvent,
    Usage,
)
from rom_agent.providers.openai_request import request_json
from rom_agent.providers.openai_stream import ChunkWriter, StreamAccumulator
from rom_agent.providers.openai_wire import (
    WireFormatError,
    completion_json,
    finish_reason_of,
    messages_json,
    messages_of,
    response_of,
    stop_reason_of,
    tools_of,
)

CALL = ToolUseBlock("call_1", "weather", {"city": "Recife"})


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("tool_use", "tool_calls"),
        ("max_tokens", "length"),
        ("content_filtered", "content_filter"),
    ],
)
def test_finish_reasons_map_both_ways(stop_reason: str, finish: str) -> None:
    assert finish_reason_of(stop_reason) == finish
    assert stop_reason_of(finish) == stop_reason


def test_a_completion_written_by_the_facade_reads_back_in_the_provider() -> None:
    answer = ChatResponse("m", (TextBlock("Vou ver."), CALL), "tool_use", Usage(30, 4))
    body = orjson.loads(orjson.dumps(completion_json(answer, "m", "chatcmpl-1", 0)))
    decoded, finish = response_of("m", body)
    assert decoded == answer
    assert finish == "tool_calls"


def test_messages_written_by_the_provider_read_back_in_the_facade() -> None:
    history = [
        Message.text("user", "Tempo em Recife?"),
        Message("assistant", (TextBlock("Vou ver."), CALL)),
        Message("user", (ToolResultBlock("call_1", "31 °C"),)),
    ]
    wire = messages_json("Seja breve", history)
    assert [m["role"] for m in wire] == ["system", "user", "assistant", "tool"]
    assert messages_of(wire, 1000) == ("Seja breve", history)


def test_request_body_carries_tools_and_stream_options() -> None:
    tool = ToolSpec("weather", "Weather", {"type": "object", "properties": {}})
    request = ChatRequest("m", [Message.text("user", "Oi")], tools=[tool], max_tokens=9)
    body = request_json(request, stream=True)
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 9
    assert tools_of(body["tools"]) == (tool,)


def _replay(frames: bytes) -> tuple[list[object], StreamAccumulator]:
    accumulator = StreamAccumulator()
    datas = [line[6:] for line in frames.split(b"\n") if line.startswith(b"data: ")]
    events = list(accumulator.handle_batch(datas))
    return events, accumulator


def test_a_stream_written_by_the_facade_reads_back_in_the_provider() -> None:
    writer = ChunkWriter("chatcmpl-1", 0, "m")
    frames = writer.text("Vou") + writer.text(" ver.") + writer.tool_use(CALL)
    # Two upstream calls billed (e.g. a continued stream): the facade reports their sum.
    writer.add_usage(Usage(10, 2))
    writer.add_usage(Usage(10, 3))
    frames += writer.finish("tool_use", include_usage=True)
    events, accumulator = _replay(frames)
    assert events == [TextDelta("Vou ver."), ToolUseEvent(CALL)]
    assert accumulator.done and accumulator.finish_reason == "tool_calls"
    assert accumulator.usage == Usage(20, 5)


def test_wire_usage_is_a_total_the_last_one_wins() -> None:
    """vLLM's continuous usage stats send a running total on every chunk: not summed."""
    accumulator = StreamAccumulator()
    for completion in (1, 2, 3):
        chunk = {
            "choices": [{"index": 0, "delta": {"content": "x"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": completion},
        }
        accumulator.handle(chunk)
    assert accumulator.usage == Usage(5, 3)


def test_bad_messages_are_wire_format_errors() -> None:
    with pytest.raises(WireFormatError, match="unknown role"):
        messages_of([{"role": "robot", "content": "x"}], 100)
    with pytest.raises(WireFormatError, match="exceeds 3 characters"):
        messages_of([{"role": "user", "content": "long"}], 3)
    bad_call = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}
    with pytest.raises(WireFormatError, match="JSON"):
        messages_of([{"role": "user", "content": "x"}, bad_call], 100)
