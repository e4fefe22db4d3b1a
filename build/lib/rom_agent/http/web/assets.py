"""The pages' static files and HTML templates, read once at import.

Each static file is served under a name carrying a hash of its content
(`/static/console.3f2a9c0d1e7b.js`), so it can be cached for a year: a changed file gets a new
name, and the HTML (never cached) names the current one. Templates are `string.Template`s;
every value is HTML-escaped on the way in, so no caller can inject markup.
"""

from __future__ import annotations

import hashlib
import html
import string
from dataclasses import dataclass
from importlib import resources

from starlette.responses import Response

from rom_agent.http.errors import ApiError

STATIC_PREFIX = "/static/"
_MEDIA_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
_IMMUTABLE = "public, max-age=31536000, immutable"

# No inline script or style, nothing from another origin. `data:` images only for the favicon.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make form posts send `Origin: null`
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",  # pages carry the CSRF token and always name the newest files
}


@dataclass(frozen=True, slots=True)
class Asset:
    name: str  # as in the source tree: "console.js"
    url: str  # hashed: "/static/console.<hash>.js"
    body: bytes
    media_type: str
    etag: str


def _load_assets() -> dict[str, Asset]:
    folder = resources.files("rom_agent.http.web") / "assets"
    assets: dict[str, Asset] = {}
    for entry in sorted(folder.iterdir(), key=lambda item: item.name):
        stem, dot, ext = entry.name.rpartition(".")
        media_type = _MEDIA_TYPES.get(dot + ext)
        if not stem or media_type is None:
            continue
        body = entry.read_bytes()
        digest = hashlib.sha256(body).hexdigest()[:12]
        assets[entry.name] = Asset(
            entry.name, f"{STATIC_PREFIX}{stem}.{digest}.{ext}", body, media_type, f'"{digest}"'
        )
    return assets


ASSETS = _load_assets()
_BY_URL = {asset.url: asset for asset in ASSETS.values()}


def asset_url(name: str) -> str:
    return ASSETS[name].url


def static_response(path: str, if_none_match: str | None) -> Response:
    asset = _BY_URL.get(path)
    if asset is None:
        raise ApiError(404, "NOT_FOUND", "no such static file")
    headers = {
        "Cache-Control": _IMMUTABLE,
        "ETag": asset.etag,
        "X-Content-Type-Options": "nosniff",
    }
    if if_none_match == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


def _load_template(name: str) -> string.Template:
    text = (resources.files("rom_agent.http.web") / "templates" / name).read_text("utf-8")
    return string.Template(text)


_TEMPLATES = {name: _load_template(name) for name in ("chat.html", "console.html", "login.html")}


def render(template: str, status: int = 200, **values: str) -> Response:
    """A page from `template`; `$css`/`$common` and `$<name>_js` name the hashed files."""
    escaped = {key: html.escape(value, quote=True) for key, value in values.items()}
    escaped.setdefault("css", asset_url("app.css"))
    escaped.setdefault("common_js", asset_url("common.js"))
    body = _TEMPLATES[template].substitute(escaped)
    return Response(
        body, status_code=status, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS
    )
