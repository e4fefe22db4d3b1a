"""The admin API (SPEC §3): runtime flags, their audit log, breakers and the bottleneck.

Every route requires `X-Admin-Token`. A missing and a wrong token get the same 401; without
`ADMIN_TOKEN` every route answers 503 `ADMIN_DISABLED`. The token is compared in constant time
and never logged or echoed. Admin routes never pass through admission control, so they answer
while the chat queue is full — exactly when an operator needs them.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from rom_agent.config import SECRET_KEYS, ConfigError, Settings
from rom_agent.flag_changes import RUNTIME_KEYS, STATIC_KEYS, AuditEntry, public_value
from rom_agent.flags import FlagStore
from rom_agent.http.errors import ApiError, invalid
from rom_agent.http.requests import ascii_int, json_response, parse_json_object, read_body
from rom_agent.http.services import Services, services_of
from rom_agent.logs import get_logger

log = get_logger("rom_agent.admin")

MIN_TOKEN_CHARS = 32
_MAX_BODY_BYTES = 64 * 1024
_HISTORY_DEFAULT, _HISTORY_MAX = 50, 1000
_BREAKER_METHODS = {"open": "force_open", "close": "force_close", "reset": "reset"}


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


async def require_admin(request: Request) -> None:
    """The guard of every `/admin` route in the route table."""
    token = services_of(request).settings.admin_token
    expected = token.get_secret_value() if token is not None else ""
    if not expected:
        raise ApiError(503, "ADMIN_DISABLED", "admin API is disabled: ADMIN_TOKEN is not set")
    presented = request.headers.get("x-admin-token", "")
    # Digests first: compare_digest's time then depends on neither content nor length.
    if not hmac.compare_digest(_digest(presented), _digest(expected)):
        log.warning("admin authentication failed", path=request.url.path, client=client_of(request))
        raise ApiError(401, "UNAUTHORIZED", "missing or invalid X-Admin-Token")


def warn_about_admin_token(settings: Settings) -> None:
    """Startup log lines about the admin token (never its value or length)."""
    token = settings.admin_token
    if token is None or not token.get_secret_value():
        log.info("admin API disabled: ADMIN_TOKEN is not set")
    elif len(token.get_secret_value()) < MIN_TOKEN_CHARS:
        log.warning(
            f"ADMIN_TOKEN is shorter than {MIN_TOKEN_CHARS} characters; generate one with "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )


def client_of(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def flags_view(flags: FlagStore) -> dict[str, Any]:
    """GET /admin/flags: every flag and parameter, typed; secrets only as configured or not."""
    settings = flags.current
    keys = (*RUNTIME_KEYS, *STATIC_KEYS)
    return {
        "flags": {key.upper(): public_value(getattr(settings, key)) for key in keys},
        "sources": {key.upper(): flags.source(key) for key in keys},
        "runtimeKeys": [key.upper() for key in RUNTIME_KEYS],
        "secrets": {name: bool(getattr(settings, name.lower())) for name in sorted(SECRET_KEYS)},
        "updatedAt": flags.updated_at,
    }


def _changed_view(flags: FlagStore, entry: AuditEntry) -> dict[str, Any]:
    return {**flags_view(flags), "changed": entry.changes}


# ---------------------------------------------------------------------- flags


async def get_flags(request: Request) -> Response:
    return json_response(flags_view(services_of(request).flags))


async def patch_flags(request: Request) -> Response:
    services = services_of(request)
    data = parse_json_object(await read_body(request, _MAX_BODY_BYTES))
    # Also accept {"flags": {...}}, the shape GET answers with.
    if set(data) == {"flags"} and isinstance(data["flags"], dict):
        data = data["flags"]
    try:
        entry = await services.flags.update(data, client=client_of(request))
    except ConfigError as exc:
        raise invalid(str(exc)) from None
    warn_if_faults_switched_on(entry)
    return json_response(_changed_view(services.flags, entry))


def warn_if_faults_switched_on(entry: AuditEntry) -> None:
    """Fault injection switched on at runtime persists across restarts: say so loudly."""
    change = entry.changes.get("ENABLE_FAULT_INJECTION")
    if change is not None and change.get("new") is True and change.get("old") is not True:
        log.warning(
            "FAULT INJECTION SWITCHED ON at runtime: FORCE_ERROR messages and X-Fault headers "
            "now make requests fail on purpose, and the override survives restarts until "
            "removed (DELETE /admin/flags/ENABLE_FAULT_INJECTION).",
            client=entry.client,
        )


async def delete_flag(request: Request) -> Response:
    services = services_of(request)
    key: str = request.path_params["key"]
    try:
        entry = await services.flags.remove(key, client=client_of(request))
    except ConfigError as exc:  # the env/default values are incompatible with other overrides
        raise invalid(str(exc)) from None
    if entry is None:
        raise ApiError(404, "NOT_FOUND", f"no runtime override for {key.upper()}")
    return json_response(_changed_view(services.flags, entry))


async def flag_history(request: Request) -> Response:
    limit = ascii_int(request.query_params.get("limit", str(_HISTORY_DEFAULT)))
    if limit is None or not 1 <= limit <= _HISTORY_MAX:
        raise invalid(f"limit must be an integer from 1 to {_HISTORY_MAX}")
    entries = await services_of(request).flags.history(limit)
    return json_response({"entries": [entry.to_dict() for entry in entries]})


# ---------------------------------------------------------------------- breakers, bottleneck


async def get_breakers(request: Request) -> Response:
    """Local breaker states; in fleet mode also each model's override and live hint, and
    which replica set them (breaker state itself is never shared)."""
    services = services_of(request)
    body = services.breakers.snapshot()
    body["replica"] = services.fleet.replica_id
    sync = services.fleet.breaker_sync
    for entry in body["breakers"]:
        entry.update(sync.view(entry["model"]) if sync else {"override": None, "hint": None})
    return json_response(body)


_MAX_OVERRIDE_S = 7 * 24 * 3600


def _expires_in(request: Request) -> float | None:
    raw = request.query_params.get("expiresInS")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= _MAX_OVERRIDE_S:
        raise invalid(f"expiresInS: expected seconds between 0 and {_MAX_OVERRIDE_S}")
    return value


async def breaker_action(request: Request) -> Response:
    services = services_of(request)
    model: str = request.path_params["model"]
    action: str = request.path_params["action"]
    method = _BREAKER_METHODS.get(action)
    if method is None:
        raise ApiError(404, "NOT_FOUND", f"unknown breaker action {action!r} (open|close|reset)")
    if model not in {ref.id for ref in services.chain}:
        known = ", ".join(ref.id for ref in services.chain)
        raise ApiError(404, "NOT_FOUND", f"unknown model {model!r}; known models: {known}")
    expires_in_s = _expires_in(request)
    old = _breaker_state(services, model)
    getattr(services.breakers, method)(model)
    new = _breaker_state(services, model)
    override = None
    if services.fleet.breaker_sync is not None:  # fleet-wide within a second
        override = await services.fleet.breaker_sync.publish_override(
            model, action, client=client_of(request), expires_in_s=expires_in_s
        )
    await services.flags.record(
        f"breaker_{action}",
        {"state": {"old": old, "new": new}},
        client=client_of(request),
        target=model,
    )
    log.warning("breaker changed by operator", model=model, action=action, old=old, new=new)
    return json_response(
        {
            "model": model,
            "action": action,
            "previousState": old,
            "state": new,
            "enabled": services.flags.current.enable_circuit_breaker,
            "override": override,
            "replica": services.fleet.replica_id,
        }
    )


async def get_bottleneck(request: Request) -> Response:
    return json_response(services_of(request).bottleneck.snapshot())


async def get_fleet(request: Request) -> Response:
    """The live replicas with their state (from the Redis registry) and the shared state."""
    return json_response(await services_of(request).fleet.snapshot())


def _breaker_state(services: Services, model: str) -> str | None:
    return dict(services.breakers.states()).get(model)
