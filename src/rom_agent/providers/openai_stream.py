"""OpenAI chat.completion.chunk streams, both directions: the client-side accumulator and the
server-side SSE chunk writer (the usage rule is in `openai_wire`'s docstring)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from rom_agent.domain.messages import (
    StreamEvent,
    TextDelta,
    ToolUseBlock,
    ToolUseEvent,
    Usage,
)
from rom_agent.providers.openai_wire import (
    arguments_of,
    finish_reason_of,
    tool_call_json,
    usage_json,
    usage_of,
)

DONE = b"[DONE]"


class StreamAccumulator:
    """chat.completion.chunk objects → our stream events (client side).

    Text passes through as it comes; tool-call deltas are assembled by their `index` and
    emitted whole when the choice finishes. Usage follows the rule in `openai_wire`'s docstring.
    """

    __slots__ = ("_tools", "done", "finish_reason", "saw_usage", "text_chars", "usage")
    # `text_chars`: characters generated (text and tool calls), for a usage estimate.

    def __init__(self) -> None:
        self._tools: dict[int, list[Any]] = {}  # index → [id, name, argument fragments]
        self.done = False  # `[DONE]` seen
        self.finish_reason: str | None = None  # the wire value, once a choice finished
        self.usage = Usage()
        self.saw_usage = False
        self.text_chars = 0

    @property
    def finished(self) -> bool:
        """A choice carried its finish_reason: the answer is whole."""
        return self.finish_reason is not None

    def handle(self, chunk: dict[str, Any]) -> list[StreamEvent]:
        if chunk.get("usage"):
            self.usage = usage_of(chunk["usage"])  # a total: the last one wins
            self.saw_usage = True
        events: list[StreamEvent] = []
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                self.text_chars += len(text)
                events.append(TextDelta(text))
            for call in delta.get("tool_calls") or ():
                self._tool_delta(call)
            finish = choice.get("finish_reason")
            if finish:
                self.finish_reason = finish
                for _, tool in sorted(self._tools.items()):
                    arguments = "".join(tool[2])
                    self.text_chars += len(tool[1]) + len(arguments)
                    block = ToolUseBlock(tool[0], tool[1], arguments_of(arguments))
                    events.append(ToolUseEvent(block))
                self._tools.clear()
        return events

    def handle_batch(self, batch: list[bytes], on_error: Any = None) -> Iterator[StreamEvent]:
        """The events of one network read, consecutive text deltas merged into one.

        When the upstream is ahead of us its chunks arrive together; forwarding them as one
        saves a pipeline step, an SSE frame and a socket write per chunk, as a byte-forwarding
        proxy would. A live model's tokens arrive spaced out and pass one by one. Whatever was
        decoded before a failure is yielded before the failure is raised. `on_error(chunk)`
        turns an in-stream `{"error": …}` object into the exception to raise.
        """
        texts: list[str] = []
        try:
            for data in batch:
                if data == DONE:
                    self.done = True
                    break
                chunk = orjson.loads(data)
                if "error" in chunk and on_error is not None:
                    raise on_error(chunk)
                for event in self.handle(chunk):
                    if isinstance(event, TextDelta):
                        texts.append(event.text)
                        continue
                    if texts:
                        yield TextDelta("".join(texts))
                        texts = []
                    yield event
        except Exception:
            if texts:
                yield TextDelta("".join(texts))
            raise
        if texts:
            yield TextDelta("".join(texts))

    def _tool_delta(self, call: dict[str, Any]) -> None:
        index = call.get("index", 0)
        tool = self._tools.get(index)
        if tool is None:
            tool = self._tools[index] = ["", "", []]
        if call.get("id"):
            tool[0] = call["id"]
        function = call.get("function") or {}
        if function.get("name"):
            tool[1] = function["name"]
        if function.get("arguments"):
            tool[2].append(function["arguments"])


def sse(body: Any) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


class ChunkWriter:
    """Our stream events → chat.completion.chunk SSE frames (server side).

    The role chunk rides with the first content chunk (one write instead of two); tool calls
    get consecutive indexes; usage is summed over `UsageEvent`s (see the usage rule).
    """

    __slots__ = ("_head", "_tool_index", "completion_id", "created", "model", "usage")

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self.usage = Usage()
        self._tool_index = 0
        self._head = self.chunk({"role": "assistant", "content": ""})

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        body: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        return sse(body)

    def _with_head(self, frame: bytes) -> bytes:
        head, self._head = self._head, b""
        return head + frame

    def text(self, text: str) -> bytes:
        return self._with_head(self.chunk({"content": text}))

    def tool_use(self, block: ToolUseBlock) -> bytes:
        delta = {"tool_calls": [tool_call_json(block, self._tool_index)]}
        self._tool_index += 1
        return self._with_head(self.chunk(delta))

    def add_usage(self, usage: Usage) -> None:
        self.usage = self.usage + usage

    def pending_head(self) -> bytes:
        """The role chunk if nothing was written yet (an error must follow it)."""
        head, self._head = self._head, b""
        return head

    def finish(self, stop_reason: str, include_usage: bool) -> bytes:
        """The finish chunk, the usage chunk if asked for, and `[DONE]`."""
        frames = [self._with_head(self.chunk({}, finish_reason_of(stop_reason)))]
        if include_usage:
            body = {
                "id": self.completion_id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage_json(self.usage),
            }
            frames.append(sse(body))
        frames.append(b"data: [DONE]\n\n")
        return b"".join(frames)
