"""A small synchronous client for a running service's HTTP API, on the standard library.

Used by `rom-agent flags` and the rollout command. The admin token goes only into the
`X-Admin-Token` header of admin calls; it is never part of an error message, and redirects are
never followed, so the token cannot be carried to another host.
"""

from __future__ import annotations

import ipaddress
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

DEFAULT_URL = "http://127.0.0.1:8000"


class ApiCallError(Exception):
    """A call failed: the service was unreachable (`status` None) or answered with an error."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code

    def __str__(self) -> str:
        if self.status is None:
            return self.message
        return f"{self.message} (HTTP {self.status}{' ' + self.code if self.code else ''})"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return orjson.loads(self.body)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises HTTPError with the 3xx, which `request` returns


class AdminClient:
    def __init__(self, base_url: str, token: str | None = None, *, timeout_s: float = 10.0):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"URL must start with http:// or https://: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout_s = timeout_s
        self._opener = urllib.request.build_opener(_NoRedirects)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        admin: bool = False,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Reply:
        """Any call; an HTTP error status is a `Reply`, only an unreachable service raises."""
        sent = {"Accept": "application/json", **(headers or {})}
        data = None
        if body is not None:
            data = orjson.dumps(body)
            sent["Content-Type"] = "application/json"
        if admin:
            if not self._token:
                raise ApiCallError("no admin token: set ADMIN_TOKEN or pass --token")
            sent["X-Admin-Token"] = self._token
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers=sent
        )
        timeout = timeout_s if timeout_s is not None else self._timeout_s
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return Reply(response.status, _lower(response.headers), response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return Reply(exc.code, _lower(exc.headers), exc.read())
        except OSError as exc:  # URLError, refused connections and timeouts
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise ApiCallError(f"cannot reach {self.base_url}: {reason}") from None

    def admin(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """An admin call's JSON answer; `ApiCallError` with the server's message otherwise."""
        reply = self.request(method, path, body=body, admin=True)
        if not reply.ok:
            raise error_of(reply)
        result: dict[str, Any] = reply.json()
        return result

    # ------------------------------------------------------------------ admin routes

    def get_flags(self) -> dict[str, Any]:
        return self.admin("GET", "/admin/flags")

    def set_flags(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        return self.admin("PATCH", "/admin/flags", dict(changes))

    def unset_flag(self, key: str) -> dict[str, Any]:
        return self.admin("DELETE", f"/admin/flags/{_segment(key)}")

    def flag_history(self, limit: int = 50) -> dict[str, Any]:
        return self.admin("GET", f"/admin/flags/history?limit={limit}")

    def breakers(self) -> dict[str, Any]:
        return self.admin("GET", "/admin/breakers")

    def breaker(self, model: str, action: str) -> dict[str, Any]:
        return self.admin("POST", f"/admin/breakers/{_segment(model)}/{_segment(action)}")

    def bottleneck(self) -> dict[str, Any]:
        return self.admin("GET", "/admin/bottleneck")


def error_of(reply: Reply) -> ApiCallError:
    """The SPEC error body's message and code, or a short description of anything else."""
    if 300 <= reply.status < 400:
        target = reply.headers.get("location", "?")
        return ApiCallError(f"redirected to {target}; use that URL", status=reply.status)
    try:
        body = reply.json()
        return ApiCallError(str(body["error"]), status=reply.status, code=str(body["code"]))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return ApiCallError(reply.text[:200] or "no body", status=reply.status)


def _lower(headers: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def _segment(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def is_local_or_tls(url: str) -> bool:
    """Whether the admin token may travel to `url` unencrypted without a warning."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
