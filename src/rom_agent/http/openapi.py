"""The OpenAPI document of the service, served at `/openapi.json`.

Written by hand from what the routes really accept and answer (SPEC bodies, OpenAI shapes,
Prometheus text), one operation per API route of the table; `tests/test_openapi.py` checks that
the document and the table list the same routes and fuzzes the running app against it with
schemathesis. The chat page and the console (`http/web/`) are a user interface, not an API, and
are left out. The model ids of this instance are enumerated, so the document is built per
application (and cached).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from rom_agent import __version__
from rom_agent.config import Settings
from rom_agent.flag_changes import RUNTIME_KEYS
from rom_agent.http.services import services_of

Schema = dict[str, Any]

_ID = "^[A-Za-z0-9_.:-]{1,128}$"
# One Server-Sent Event: `data:` carries one JSON object (or OpenAI's final `[DONE]`).
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int, openai: bool = False) -> dict[str, Schema]:
    schema = _ref("OpenAIError" if openai else "Error")
    described = {
        400: "invalid request",
        401: "missing or invalid credentials",
        404: "not found",
        408: "body not received in time",
        413: "body too large",
        502: "every model of the chain failed",
        503: "overloaded, circuit open, draining, or disabled",
        504: "past the request deadline",
    }
    return {str(status): _json(schema, described[status]) for status in statuses}


def flag_changes() -> Schema:
    """The runtime keys with their types and ranges, from the settings model itself."""
    fields = Settings.model_json_schema()["properties"]
    kept = ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
    return {
        "type": "object",
        "description": 'runtime keys and their new values (also accepted as {"flags": {…}})',
        "minProperties": 1,
        "properties": {
            key.upper(): {name: value for name, value in fields[key].items() if name in kept}
            for key in RUNTIME_KEYS
        },
        "additionalProperties": False,
    }


def _text(settings: Settings) -> Schema:
    # At least one character that is not whitespace: an empty message is a 400.
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": settings.max_message_chars,
        "pattern": r"[^\s\x1c-\x1f\x85]",
    }


def components(settings: Settings, models: list[str]) -> Schema:
    text = _text(settings)
    usage = {
        "type": "object",
        "required": ["inputTokens", "outputTokens", "totalTokens"],
        "properties": {
            name: {"type": "integer", "minimum": 0}
            for name in ("inputTokens", "outputTokens", "totalTokens")
        },
    }
    model = {"type": "string", "enum": models}
    conversation_id = {"type": "string", "pattern": _ID, "not": {"enum": [".", ".."]}}
    return {
        "Error": {
            "type": "object",
            "required": ["error", "status", "code"],
            "properties": {
                "error": {"type": "string"},
                "status": {"type": "integer"},
                "code": {"type": "string"},
            },
            "additionalProperties": False,
        },
        "OpenAIError": {
            "type": "object",
            "required": ["error", "status", "code"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                },
                "status": {"type": "integer"},
                "code": {"type": "string"},
            },
        },
        "ChatRequest": {
            "type": "object",
            "description": "`mensagem` or `message` (the first non-null of the two)",
            "properties": {
                "mensagem": {"type": ["string", "null"]},
                "message": {"type": ["string", "null"]},
                "conversationId": conversation_id,
                "model": model,
            },
            "anyOf": [
                {"required": ["mensagem"], "properties": {"mensagem": text}},
                {
                    "required": ["message"],
                    "properties": {"mensagem": {"type": "null"}, "message": text},
                },
            ],
        },
        "ChatResponse": {
            "type": "object",
            "required": [
                "response",
                "conversationId",
                "modelUsed",
                "fallbackUsed",
                "attempts",
                "usage",
                "latencyMs",
                "toolsUsed",
            ],
            "properties": {
                "response": {"type": "string"},
                "conversationId": {"type": "string"},
                "modelUsed": model,
                "fallbackUsed": {"type": "boolean"},
                "attempts": {"type": "integer", "minimum": 1},
                "usage": usage,
                "latencyMs": {"type": "integer", "minimum": 0},
                "toolsUsed": {"type": "array", "items": {"type": "object"}},
                "guardrail": {"type": "object"},
            },
        },
        "Conversation": {
            "type": "object",
            "required": ["conversationId", "messages"],
            "properties": {
                "conversationId": {"type": "string"},
                "messages": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["role", "content"],
                        "properties": {
                            "role": {"enum": ["user", "assistant"]},
                            "content": {"type": "string"},
                            "blocks": {"type": "array", "items": {"type": "object"}},
                            "model": {"type": ["string", "null"]},
                            "createdAt": {"type": "string"},
                        },
                    },
                },
            },
        },
        "ChatCompletionRequest": {
            "type": "object",
            "required": ["model", "messages"],
            "properties": {
                "model": model,
                "messages": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 8,
                    "contains": {"required": ["role"], "properties": {"role": {"const": "user"}}},
                    "items": {
                        "type": "object",
                        "required": ["role", "content"],
                        "properties": {"role": {"enum": ["system", "user"]}, "content": text},
                        "additionalProperties": False,
                    },
                },
                "stream": {"type": "boolean"},
                "max_tokens": {"type": "integer", "minimum": 1, "maximum": 4096},
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            },
            "additionalProperties": False,
        },
        "ChatCompletion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "chat.completion"},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {"type": "array", "items": {"type": "object"}},
                "usage": {"type": "object"},
            },
        },
        "ResponseRequest": {
            "type": "object",
            "required": ["model", "input"],
            "properties": {
                "model": model,
                "input": text,
                "instructions": {"type": "string"},
                "stream": {"type": "boolean"},
                "max_output_tokens": {"type": "integer", "minimum": 1, "maximum": 4096},
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            },
            "additionalProperties": False,
        },
        "Response": {
            "type": "object",
            "required": ["id", "object", "model", "output"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "response"},
                "model": {"type": "string"},
                "output": {"type": "array", "items": {"type": "object"}},
            },
        },
        "Model": {
            "type": "object",
            "required": ["id", "object", "created", "owned_by"],
            "properties": {"id": {"type": "string"}, "object": {"const": "model"}},
        },
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "object", "created", "owned_by"],
                        "properties": {"id": model, "object": {"const": "model"}},
                    },
                },
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "uptime", "version"],
            "properties": {
                "status": {"const": "ok"},
                "uptime": {"type": "number"},
                "version": {"type": "string"},
            },
        },
        "Readiness": {
            "type": "object",
            "required": ["status", "checks"],
            "properties": {
                "status": {"enum": ["ready", "draining", "degraded"]},
                "checks": {"type": "object"},
            },
        },
        "Flags": {
            "type": "object",
            "required": ["flags", "sources", "runtimeKeys", "secrets", "updatedAt"],
            "properties": {
                "flags": {"type": "object"},
                "sources": {
                    "type": "object",
                    "additionalProperties": {"enum": ["default", "env", "runtime"]},
                },
                "runtimeKeys": {"type": "array", "items": {"type": "string"}},
                "secrets": {"type": "object", "additionalProperties": {"type": "boolean"}},
                "updatedAt": {"type": ["string", "null"]},
                "changed": {"type": "object"},
            },
        },
        "FlagChanges": flag_changes(),
        "AuditEntries": {
            "type": "object",
            "required": ["entries"],
            "properties": {"entries": {"type": "array", "items": {"type": "object"}}},
        },
        "Breakers": {
            "type": "object",
            "required": ["enabled", "breakers"],
            "properties": {
                "enabled": {"type": "boolean"},
                "breakers": {"type": "array", "items": {"type": "object"}},
            },
        },
        "BreakerAction": {
            "type": "object",
            "required": ["model", "action", "previousState", "state", "enabled"],
            "properties": {"model": model, "action": {"enum": ["open", "close", "reset"]}},
        },
        "Snapshot": {"type": "object"},
    }


def _operation(
    summary: str,
    responses: dict[str, Schema],
    *,
    body: str | None = None,
    parameters: list[Schema] | None = None,
    admin: bool = False,
) -> Schema:
    operation: Schema = {"summary": summary, "responses": responses}
    if body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    if parameters:
        operation["parameters"] = parameters
    if admin:
        operation["security"] = [{"adminToken": []}]
        operation["responses"] = {**responses, **_errors(401)}
    return operation


def paths(models: list[str]) -> dict[str, dict[str, Schema]]:
    chat_errors = _errors(400, 408, 413, 502, 503, 504)
    openai_errors = _errors(400, 408, 413, 502, 503, 504, openai=True)
    path_id = {
        "name": "conversation_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": _ID, "not": {"enum": [".", ".."]}},
    }
    return {
        "/api/chat": {
            "post": _operation(
                "A chat turn; 200 means it is stored",
                {"200": _json(_ref("ChatResponse"), "the answer"), **chat_errors},
                body="ChatRequest",
            )
        },
        "/api/chat/stream": {
            "post": _operation(
                "A chat turn as Server-Sent Events (connected, chunk…, done or error)",
                {
                    "200": {
                        "description": "`data: {json}` events",
                        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
                    },
                    **chat_errors,
                },
                body="ChatRequest",
            )
        },
        "/api/conversations/{conversation_id}": {
            "get": _operation(
                "The stored messages of a conversation",
                {"200": _json(_ref("Conversation"), "the messages"), **_errors(400, 404)},
                parameters=[path_id],
            )
        },
        "/v1/chat/completions": {
            "post": _operation(
                "OpenAI-compatible Chat Completions (JSON, or SSE chunks with `stream: true`)",
                {
                    "200": {
                        "description": "a completion, or its chunks",
                        "content": {
                            "application/json": {"schema": _ref("ChatCompletion")},
                            "text/event-stream": {"schema": _SSE_EVENT},
                        },
                    },
                    **openai_errors,
                },
                body="ChatCompletionRequest",
            )
        },
        "/v1/responses": {
            "post": _operation(
                "OpenAI-compatible Responses API (JSON, or SSE events with `stream: true`)",
                {
                    "200": {
                        "description": "a response, or its events",
                        "content": {
                            "application/json": {"schema": _ref("Response")},
                            "text/event-stream": {"schema": _SSE_EVENT},
                        },
                    },
                    **openai_errors,
                },
                body="ResponseRequest",
            )
        },
        "/v1/models/{model_id}": {
            "get": _operation(
                "One configured model (id or provider/id)",
                {"200": _json(_ref("Model"), "the model"), **_errors(401, 404, openai=True)},
                parameters=[
                    {
                        "name": "model_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
            )
        },
        "/v1/models": {
            "get": _operation(
                "The configured models",
                {"200": _json(_ref("ModelList"), "the models"), **_errors(401, openai=True)},
            )
        },
        "/health": {"get": _operation("Liveness", {"200": _json(_ref("Health"), "alive")})},
        "/ready": {
            "get": _operation(
                "Readiness",
                {
                    "200": _json(_ref("Readiness"), "ready"),
                    "503": _json(_ref("Readiness"), "draining or degraded"),
                },
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics",
                {
                    "200": {
                        "description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(404),
                },
            )
        },
        "/openapi.json": {
            "get": _operation(
                "This document", {"200": _json({"type": "object"}, "the OpenAPI document")}
            )
        },
        "/admin/flags": {
            "get": _operation(
                "Every flag and parameter, with its source",
                {"200": _json(_ref("Flags"), "the flags"), **_errors(503)},
                admin=True,
            ),
            "patch": _operation(
                "Change runtime flags (validated, applied at once, persisted, audited)",
                {"200": _json(_ref("Flags"), "the flags after the change"), **_errors(400, 503)},
                body="FlagChanges",
                admin=True,
            ),
        },
        "/admin/flags/history": {
            "get": _operation(
                "The audit log, newest first",
                {"200": _json(_ref("AuditEntries"), "entries"), **_errors(400, 503)},
                parameters=[
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    }
                ],
                admin=True,
            )
        },
        "/admin/flags/{key}": {
            "delete": _operation(
                "Drop a runtime override",
                {"200": _json(_ref("Flags"), "the flags"), **_errors(400, 404, 503)},
                parameters=[
                    {"name": "key", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                admin=True,
            )
        },
        "/admin/breakers": {
            "get": _operation(
                "Breaker states",
                {"200": _json(_ref("Breakers"), "the breakers"), **_errors(503)},
                admin=True,
            )
        },
        "/admin/breakers/{model}/{action}": {
            "post": _operation(
                "Force a breaker open or closed, or reset it",
                {"200": _json(_ref("BreakerAction"), "the change"), **_errors(404, 503)},
                parameters=[
                    {
                        "name": "model",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": models},
                    },
                    {
                        "name": "action",
                        "in": "path",
                        "required": True,
                        "schema": {"enum": ["open", "close", "reset"]},
                    },
                ],
                admin=True,
            )
        },
        "/admin/bottleneck": {
            "get": _operation(
                "Admission state",
                {"200": _json(_ref("Snapshot"), "running, queued, limits"), **_errors(503)},
                admin=True,
            )
        },
        "/admin/fleet": {
            "get": _operation(
                "Fleet replicas and shared state",
                {"200": _json(_ref("Snapshot"), "the fleet"), **_errors(503)},
                admin=True,
            )
        },
    }


def document(settings: Settings, models: list[str]) -> Schema:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ROM Agent",
            "version": __version__,
            "description": "Resilient LLM chat service. Errors: docs/contract.md.",
        },
        "paths": paths(models),
        "components": {
            "schemas": components(settings, models),
            "securitySchemes": {
                "adminToken": {"type": "apiKey", "in": "header", "name": "X-Admin-Token"},
            },
        },
    }


_cache: dict[int, bytes] = {}


async def openapi(request: Request) -> Response:
    services = services_of(request)
    body = _cache.get(id(services))
    if body is None:
        models = [ref.id for ref in services.chain]
        body = _cache[id(services)] = orjson.dumps(document(services.flags.current, models))
    return Response(body, media_type="application/json")
