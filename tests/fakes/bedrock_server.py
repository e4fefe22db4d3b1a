"""A fake Bedrock runtime: Converse JSON, ConverseStream eventstream frames, real error shapes.

Frames are built by a small encoder written here from the eventstream wire format (prelude with
total/headers length and CRC32, string headers, payload, message CRC32); the tests check it
against botocore's own decoder so the provider is exercised with bytes AWS would send.

Run as a process: `python -m tests.fakes.bedrock_server --port 9001 [--delay-ms 1000]`.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Mapping
from typing import Any, ClassVar

import orjson
from aiohttp import web

from tests.fakes import Behaviour, FakeUpstream, StreamPlan, main
from tests.fakes.honour import honour_bedrock

EVENTSTREAM = "application/vnd.amazon.eventstream"
_ERROR_TYPE_SUFFIX = ":http://internal.amazon.com/coral/com.amazon.bedrock/"
_DEFAULT_ERROR_TYPES = {
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}
_PADDING = "abcdefghijklmnopqrstuvwxyzABCDEFGH"  # Bedrock pads events with a "p" field


# --------------------------------------------------------------------------- wire format


def encode_frame(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One eventstream message; every header is of type 7 (string)."""
    encoded = bytearray()
    for name, value in headers.items():
        raw_name, raw_value = name.encode(), value.encode()
        encoded += struct.pack(">B", len(raw_name)) + raw_name
        encoded += struct.pack(">BH", 7, len(raw_value)) + raw_value
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + bytes(encoded) + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event_frame(event_type: str, body: Mapping[str, Any]) -> bytes:
    headers = {
        ":event-type": event_type,
        ":content-type": "application/json",
        ":message-type": "event",
    }
    return encode_frame(headers, orjson.dumps(body))


def exception_frame(exception_type: str, message: str) -> bytes:
    headers = {
        ":exception-type": exception_type,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return encode_frame(headers, orjson.dumps({"message": message}))


def _fragments(text: str, parts: int = 3) -> list[str]:
    size = max(1, -(-len(text) // parts))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


# --------------------------------------------------------------------------- server


class FakeBedrock(FakeUpstream):
    name: ClassVar[str] = "bedrock"
    stream_content_type: ClassVar[str] = EVENTSTREAM
    default_prefill: ClassVar[str] = "continue"  # Anthropic models on Bedrock continue it

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/model/{model_id}/converse", self.handler(self._converse))
        app.router.add_post("/model/{model_id}/converse-stream", self.handler(self._stream))

    async def _converse(
        self, request: web.Request, behaviour: Behaviour, payload: Any
    ) -> web.StreamResponse:
        if behaviour.status != 200:
            return await self._error(request, behaviour)
        behaviour = honour_bedrock(behaviour, payload)
        content: list[dict[str, Any]] = []
        if behaviour.text:
            content.append({"text": behaviour.text})
        for index, call in enumerate(behaviour.tool_calls):
            content.append(
                {
                    "toolUse": {
                        "toolUseId": behaviour.tool_call_id(index),
                        "name": call.name,
                        "input": dict(call.input),
                    }
                }
            )
        body: dict[str, Any] = {
            "output": {"message": {"role": "assistant", "content": content}},
            "stopReason": _stop_reason(behaviour),
            "metrics": {"latencyMs": 1},
        }
        if behaviour.usage is not None:
            body["usage"] = _usage(behaviour.usage)
        headers = {"Content-Type": "application/json", "x-amzn-RequestId": str(uuid.uuid4())}
        return await self.send_body(
            request, behaviour, status=200, headers=headers, body=orjson.dumps(body)
        )

    async def _stream(
        self, request: web.Request, behaviour: Behaviour, payload: Any
    ) -> web.StreamResponse:
        if behaviour.status != 200:
            return await self._error(request, behaviour)
        behaviour = honour_bedrock(behaviour, payload)
        return await self.send_stream(request, behaviour, self._plan(behaviour))

    def _plan(self, behaviour: Behaviour) -> StreamPlan:
        items = [event_frame("messageStart", {"role": "assistant", "p": _PADDING[:8]})]
        chunk = [False]
        block = 0
        if behaviour.text:
            for piece in behaviour.text_chunks():
                delta = {"contentBlockIndex": block, "delta": {"text": piece}, "p": _PADDING}
                items.append(event_frame("contentBlockDelta", delta))
                chunk.append(True)
            items.append(event_frame("contentBlockStop", {"contentBlockIndex": block}))
            chunk.append(False)
            block += 1
        for index, call in enumerate(behaviour.tool_calls):
            start = {"toolUseId": behaviour.tool_call_id(index), "name": call.name}
            items.append(
                event_frame(
                    "contentBlockStart",
                    {"contentBlockIndex": block, "start": {"toolUse": start}},
                )
            )
            chunk.append(False)
            for fragment in _fragments(orjson.dumps(dict(call.input)).decode()):
                delta = {"contentBlockIndex": block, "delta": {"toolUse": {"input": fragment}}}
                items.append(event_frame("contentBlockDelta", delta))
                chunk.append(True)
            items.append(event_frame("contentBlockStop", {"contentBlockIndex": block}))
            chunk.append(False)
            block += 1
        terminator = len(items)
        items.append(event_frame("messageStop", {"stopReason": _stop_reason(behaviour)}))
        metadata: dict[str, Any] = {"metrics": {"latencyMs": 1}}
        if behaviour.usage is not None:
            metadata["usage"] = _usage(behaviour.usage)
        items.append(event_frame("metadata", metadata))
        chunk += [False, False]
        return StreamPlan(items, chunk, terminator)

    async def _error(self, request: web.Request, behaviour: Behaviour) -> web.StreamResponse:
        error_type = behaviour.error_type
        if error_type is None:
            error_type = _DEFAULT_ERROR_TYPES.get(behaviour.status, "InternalServerException")
        headers = {"Content-Type": "application/json", "x-amzn-RequestId": str(uuid.uuid4())}
        if error_type:  # "" = no header, like an error from a proxy in front of Bedrock
            headers["x-amzn-ErrorType"] = error_type + _ERROR_TYPE_SUFFIX
        if behaviour.retry_after is not None:
            headers["Retry-After"] = str(behaviour.retry_after)
        body = orjson.dumps(
            {"message": behaviour.message or f"fake {error_type or behaviour.status}"}
        )
        return await self.send_body(
            request, behaviour, status=behaviour.status, headers=headers, body=body
        )

    def prefill_of(self, payload: Any) -> str | None:
        messages = payload.get("messages") if isinstance(payload, dict) else None
        if not messages or messages[-1].get("role") != "assistant":
            return None
        return "".join(block.get("text", "") for block in messages[-1].get("content") or ())

    def malformed_item(self) -> bytes:
        frame = bytearray(event_frame("contentBlockDelta", {"delta": {"text": "corrupt"}}))
        frame[-1] ^= 0xFF  # break the message CRC
        return bytes(frame)

    def stream_error_item(self, behaviour: Behaviour) -> bytes:
        name = behaviour.error_type or "modelStreamErrorException"
        name = name[0].lower() + name[1:]  # in-stream exception types are lowerCamel
        return exception_frame(name, behaviour.message or f"fake {name}")


def _stop_reason(behaviour: Behaviour) -> str:
    if behaviour.stop_reason:
        return behaviour.stop_reason
    return "tool_use" if behaviour.tool_calls else "end_turn"


def _usage(usage: tuple[int, int]) -> dict[str, int]:
    return {"inputTokens": usage[0], "outputTokens": usage[1], "totalTokens": sum(usage)}


if __name__ == "__main__":
    main(FakeBedrock)
