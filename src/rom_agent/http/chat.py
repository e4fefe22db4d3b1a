"""Chat routes: input validation, then the chat service; errors in the SPEC body format."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from rom_agent.agent.chat import ChatTurn
from rom_agent.domain.messages import ModelRef
from rom_agent.http.admission import admit, unless_client_leaves
from rom_agent.http.errors import ApiError, invalid, to_api_error
from rom_agent.http.requests import check_api_key, json_response, parse_json_object, read_body
from rom_agent.http.services import Services, services_of
from rom_agent.http.streaming import PermitStream
from rom_agent.logs import get_logger
from rom_agent.resilience.admission_permits import Permit
from rom_agent.resilience.faults import parse_fault_plan

log = get_logger("rom_agent.http.chat")

_CONVERSATION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
CONVERSATION_ID_RULE = "must be 1-128 characters of [A-Za-z0-9_.:-], and not '.' or '..'"


def valid_conversation_id(value: object) -> bool:
    """`.` and `..` would match but cannot be fetched: clients and proxies normalise them out
    of `/api/conversations/{id}`."""
    return (
        isinstance(value, str)
        and _CONVERSATION_ID.fullmatch(value) is not None
        and value not in (".", "..")
    )


@dataclass(frozen=True, slots=True)
class ChatInput:
    text: str
    conversation_id: str | None
    chain: tuple[ModelRef, ...]


def parse_chat_input(data: dict[str, Any], services: Services) -> ChatInput:
    settings = services.flags.current
    text = data.get("mensagem")
    if text is None:  # the first non-null of the two names
        text = data.get("message")
    if text is None:
        raise invalid("field 'mensagem' (or 'message') is required")
    if not isinstance(text, str):
        raise invalid("field 'mensagem' must be a string")
    if not text.strip():
        raise invalid("field 'mensagem' must not be empty")
    if len(text) > settings.max_message_chars:
        raise invalid(f"field 'mensagem' exceeds {settings.max_message_chars} characters")

    conversation_id = data.get("conversationId")
    if conversation_id is not None and not valid_conversation_id(conversation_id):
        raise invalid(f"field 'conversationId' {CONVERSATION_ID_RULE}")

    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("field 'model' must be a string")
    try:
        chain = services.pipeline.chain_for(model)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    return ChatInput(text, conversation_id, chain)


def new_conversation_id() -> str:
    return "conv-" + secrets.token_hex(8)


async def prepare_turn(request: Request, services: Services, raw: bytes) -> ChatTurn:
    """Validate the body of a chat request; the chat turn to run."""
    settings = services.flags.current
    chat_input = parse_chat_input(parse_json_object(raw), services)
    try:
        fault = parse_fault_plan(chat_input.text, request.headers.get("x-fault"), settings)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    return ChatTurn(
        text=chat_input.text,
        conversation_id=chat_input.conversation_id or new_conversation_id(),
        chain=chat_input.chain,
        deadline=services.pipeline.new_deadline(),
        fault=fault,
    )


async def admitted_turn(request: Request, services: Services) -> tuple[Permit, ChatTurn]:
    """Authenticate, read the body, take an admission slot, then validate.

    The raw body is read before admission so that a queued request can watch for its client's
    disconnect; parsing waits until a slot is granted, so a rejection costs no parsing.
    """
    check_api_key(request, services)
    raw = await read_body(request, services.flags.current.max_body_bytes)
    permit = await admit(request, services.bottleneck)
    try:
        return permit, await prepare_turn(request, services, raw)
    except BaseException:
        permit.release()
        raise


async def chat(request: Request) -> Response:
    services = services_of(request)
    permit, turn = await admitted_turn(request, services)
    async with permit:
        outcome = await unless_client_leaves(request, services.chat.chat(turn))
    return json_response(outcome.to_dict())


async def chat_stream(request: Request) -> Response:
    services = services_of(request)
    permit, turn = await admitted_turn(request, services)
    # The permit travels with the stream and is released when the stream ends, however.
    return PermitStream(chat_events(services, turn, permit), permit)


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


async def chat_events(
    services: Services, turn: ChatTurn, permit: Permit
) -> AsyncGenerator[bytes, None]:
    """SSE events of one streamed chat turn: connected, chunk…, then done or error.

    The chat runs in its own task and hands events over a queue; if the client goes away,
    the generator is closed and the task (and with it the upstream call) is cancelled.
    """
    events: asyncio.Queue[bytes | None] = asyncio.Queue()
    streamed: list[str] = []

    async def on_text(text: str) -> None:
        events.put_nowait(sse({"type": "chunk", "content": text, "chunkIndex": len(streamed)}))
        streamed.append(text)

    async def run() -> None:
        try:
            outcome = await services.chat.chat(turn, on_text=on_text)
            done = outcome.to_dict()
            # `content` is the final answer, as stored and as `response`: the chunks also
            # carried the text of earlier model turns (before tool calls), which is not.
            done.update(type="done", content=outcome.response, model=outcome.model_used)
            events.put_nowait(sse(done))
        except Exception as exc:  # every failure becomes an in-band error event
            error = to_api_error(exc)
            if error.status >= 500 and error.code == "INTERNAL":
                log.exception("stream failed", error=type(exc).__name__)
            events.put_nowait(
                sse(
                    {
                        "type": "error",
                        "error": error.message,
                        "code": error.code,
                        "recoverable": error.recoverable,
                    }
                )
            )
        finally:
            events.put_nowait(None)

    task: asyncio.Task[None] | None = None
    try:
        yield sse({"type": "connected", "conversationId": turn.conversation_id})
        task = asyncio.create_task(run())
        while (event := await events.get()) is not None:
            yield event
    finally:
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        permit.release()


async def get_conversation(request: Request) -> Response:
    services = services_of(request)
    conversation_id: str = request.path_params["conversation_id"]
    check_api_key(request, services)
    if not valid_conversation_id(conversation_id):
        raise invalid(f"conversation id {CONVERSATION_ID_RULE}")
    messages = await services.conversations.get(conversation_id)
    if messages is None:
        raise ApiError(404, "NOT_FOUND", f"conversation {conversation_id!r} not found")
    return json_response(
        {"conversationId": conversation_id, "messages": [m.to_dict() for m in messages]}
    )
