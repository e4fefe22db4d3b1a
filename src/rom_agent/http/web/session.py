"""The console's session: the admin token is typed once and traded for a cookie.

The cookie is `__Host-rom_console` — `Secure; HttpOnly; SameSite=Strict; Path=/`, no
`Max-Age` (it dies with the browser) — holding `<expiry>.<nonce>.<mac>`, where the MAC is an
HMAC keyed by a digest of `ADMIN_TOKEN`. Nothing is stored server side, so every replica
accepts it and changing the token logs every console out. The token itself never reaches the
page: not in the URL, not in storage, not in the HTML.

CSRF: every mutation needs both the session's CSRF token (an HMAC of the nonce, rendered into
the console page and sent back in `X-CSRF-Token`, which a cross-site form cannot set) and a
same-origin `Origin` (or `Sec-Fetch-Site`). Logging in has no session yet, so it relies on the
origin check alone.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from rom_agent.http.errors import ApiError
from rom_agent.http.services import services_of
from rom_agent.logs import get_logger

log = get_logger("rom_agent.console")

COOKIE = "__Host-rom_console"
CSRF_HEADER = "x-csrf-token"
SESSION_TTL_S = 12 * 3600


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def admin_token(request: Request) -> str:
    """The configured token; 503 ADMIN_DISABLED (like the admin API) when there is none."""
    token = services_of(request).settings.admin_token
    expected = token.get_secret_value() if token is not None else ""
    if not expected:
        raise ApiError(503, "ADMIN_DISABLED", "console is disabled: ADMIN_TOKEN is not set")
    return expected


def token_matches(presented: str, expected: str) -> bool:
    # Digests first: the comparison's time depends on neither content nor length.
    return hmac.compare_digest(_digest(presented), _digest(expected))


def _key(token: str) -> bytes:
    return hashlib.sha256(b"rom-agent console session\x00" + token.encode()).digest()


def _mac(key: bytes, purpose: str, text: str) -> str:
    return hmac.new(key, f"{purpose}\x00{text}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Session:
    nonce: str
    csrf: str


def new_cookie_value(token: str, now: float | None = None) -> str:
    expiry = int((now if now is not None else time.time()) + SESSION_TTL_S)
    nonce = secrets.token_urlsafe(18)
    body = f"{expiry}.{nonce}"
    return f"{body}.{_mac(_key(token), 'session', body)}"


def parse_session(value: str, token: str, now: float | None = None) -> Session | None:
    expiry, _, rest = value.partition(".")
    nonce, _, mac = rest.partition(".")
    if not (expiry.isascii() and expiry.isdigit() and nonce and mac):
        return None
    key = _key(token)
    if not hmac.compare_digest(mac, _mac(key, "session", f"{expiry}.{nonce}")):
        return None
    if int(expiry) < (now if now is not None else time.time()):
        return None
    return Session(nonce, _mac(key, "csrf", nonce))


def current_session(request: Request) -> Session | None:
    """The request's valid session, or None (also raises 503 when the console is off)."""
    token = admin_token(request)
    value = request.cookies.get(COOKIE)
    return parse_session(value, token) if value else None


def require_session(request: Request) -> Session:
    session = current_session(request)
    if session is None:
        raise ApiError(401, "UNAUTHORIZED", "console session missing or expired: log in again")
    return session


def same_origin(request: Request) -> bool:
    """True when the browser says the request comes from this very origin."""
    origin = request.headers.get("origin")
    if origin is not None:
        host = request.headers.get("host", "")
        return origin in (f"http://{host}", f"https://{host}")
    # No Origin (some same-origin GETs); fall back to the Fetch Metadata header when sent.
    return request.headers.get("sec-fetch-site", "same-origin") == "same-origin"


def require_mutation(request: Request) -> Session:
    """A logged-in, same-origin request carrying the session's CSRF token."""
    session = require_session(request)
    presented = request.headers.get(CSRF_HEADER, "")
    if not same_origin(request) or not hmac.compare_digest(presented, session.csrf):
        log.warning("console request refused: CSRF check failed", path=request.url.path)
        raise ApiError(403, "CSRF_FAILED", "cross-site request refused (CSRF check failed)")
    return session


def set_session_cookie(response: Response, value: str) -> None:
    response.set_cookie(COOKIE, value, path="/", secure=True, httponly=True, samesite="strict")


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
