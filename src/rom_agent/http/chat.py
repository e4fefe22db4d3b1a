"""Chat routes: input validation, then the chat service; errors in the SPEC body format."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from rom_agent.agent.chat import ChatTurn
from rom_agent.http.errors import ApiError, invalid
from rom_agent.http.services import Services, services_of
from rom_agent.providers.base import ModelRef

router = APIRouter()

_CONVERSATION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


@dataclass(frozen=True, slots=True)
class ChatInput:
    text: str
    conversation_id: str | None
    model: ModelRef | None
    raw: dict[str, Any]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it exceeds `limit` — never buffered whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "BODY_TOO_LARGE", f"request body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "BODY_TOO_LARGE", f"request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise invalid("request body must be a JSON object")
    return data


def parse_chat_input(data: dict[str, Any], services: Services) -> ChatInput:
    settings = services.flags.current
    text = data.get("mensagem", data.get("message"))
    if text is None:
        raise invalid("field 'mensagem' (or 'message') is required")
    if not isinstance(text, str):
        raise invalid("field 'mensagem' must be a string")
    if not text.strip():
        raise invalid("field 'mensagem' must not be empty")
    if len(text) > settings.max_message_chars:
        raise invalid(f"field 'mensagem' exceeds {settings.max_message_chars} characters")

    conversation_id = data.get("conversationId")
    if conversation_id is not None and (
        not isinstance(conversation_id, str) or not _CONVERSATION_ID.fullmatch(conversation_id)
    ):
        raise invalid("field 'conversationId' must be 1-128 characters of [A-Za-z0-9_.:-]")

    model = data.get("model")
    ref = None
    if model is not None and (
        not isinstance(model, str) or (ref := services.resolve_model(model)) is None
    ):
        known = ", ".join(services.models)
        raise invalid(f"unknown model {model!r}; known models: {known}")
    return ChatInput(text, conversation_id, ref, data)


def check_api_key(request: Request, services: Services) -> None:
    if not services.api_key_digests:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not services.api_key_valid(key.strip()):
        raise ApiError(
            401,
            "UNAUTHORIZED",
            "missing or invalid API key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def new_conversation_id() -> str:
    return "conv-" + secrets.token_hex(8)


def json_response(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


@router.post("/api/chat")
async def chat(request: Request) -> Response:
    services = services_of(request)
    check_api_key(request, services)
    settings = services.flags.current
    data = parse_json_object(await read_body(request, settings.max_body_bytes))
    chat_input = parse_chat_input(data, services)
    turn = ChatTurn(
        text=chat_input.text,
        conversation_id=chat_input.conversation_id or new_conversation_id(),
        chain=services.chain_for(chat_input.model),
        deadline=services.clock.now() + settings.request_timeout_s,
        fault=services.fault_plan(chat_input.text, request.headers.get("x-fault")),
    )
    outcome = await services.chat.chat(turn)
    return json_response(outcome.to_dict())


@router.get("/api/conversations/{conversation_id}")
async def get_conversation(request: Request, conversation_id: str) -> Response:
    services = services_of(request)
    check_api_key(request, services)
    if not _CONVERSATION_ID.fullmatch(conversation_id):
        raise invalid("conversation id must be 1-128 characters of [A-Za-z0-9_.:-]")
    messages = await services.conversations.get(conversation_id)
    if messages is None:
        raise ApiError(404, "NOT_FOUND", f"conversation {conversation_id!r} not found")
    return json_response(
        {"conversationId": conversation_id, "messages": [m.to_dict() for m in messages]}
    )
