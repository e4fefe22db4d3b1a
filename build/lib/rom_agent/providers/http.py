"""Shared plumbing of the HTTP providers: one pooled aiohttp session, timeouts, error mapping.

Providers own exactly one `ClientSession` each, created lazily inside the running loop. The
connector has no connection cap (`limit=0`): concurrency is bounded by our admission control,
never by a hidden pool queue. aiohttp does not retry POSTs, and nothing here retries either.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import aiohttp
import orjson

from rom_agent.providers.base import ErrorKind, ProviderError

# Used when a request carries no `timeout_s`; the resilience layer normally always sets one.
DEFAULT_TIMEOUT_S = 60.0

# Phrases upstreams use when the prompt does not fit the model (Bedrock, OpenAI, vLLM, Ollama).
# Plain substring checks on the lower-cased message: no regex on the error path either.
_CONTEXT_OVERFLOW_MARKERS = (
    "too long",
    "too many tokens",
    "too many input tokens",
    "context length",
    "context window",
    "context_length",
    "context limit",
    "maximum context",
)
_CONTENT_FILTER_MARKERS = ("content filter", "content_filter", "filtering policy", "blocked by")


def _json_dumps(value: object) -> str:
    return orjson.dumps(value).decode()


class SessionHolder:
    """A lazily created, pooled `ClientSession` (it must be born inside the event loop)."""

    __slots__ = ("_headers", "_session")

    def __init__(self, headers: dict[str, str] | None = None) -> None:
        self._headers = headers
        self._session: aiohttp.ClientSession | None = None

    def get(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300)
            session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                json_serialize=_json_dumps,
                timeout=aiohttp.ClientTimeout(total=None),
                trust_env=False,  # never route through an environment proxy
                raise_for_status=False,
            )
            self._session = session
        return session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def call_timeout(timeout_s: float | None) -> aiohttp.ClientTimeout:
    """A whole request/response exchange (non-streaming)."""
    seconds = timeout_s or DEFAULT_TIMEOUT_S
    return aiohttp.ClientTimeout(total=seconds, connect=seconds)


def stream_timeout(timeout_s: float | None) -> aiohttp.ClientTimeout:
    """A stream: bounded connect and silence between reads, no cap on the total length."""
    seconds = timeout_s or DEFAULT_TIMEOUT_S
    return aiohttp.ClientTimeout(total=None, connect=seconds, sock_read=seconds)


def transport_error(exc: BaseException, *, phase: str) -> ProviderError:
    """Timeouts and connection failures: always transient (never `CancelledError`).

    A timeout is not retryable: these HTTP timeouts are sized from the request's `timeout_s`,
    the pipeline's attempt budget, so they are the attempt timeout firing — a model that was
    just too slow is left for the next one, never given another whole budget. (They expire at
    the same instant as the pipeline's own timer and may win the race against it.)
    """
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return ProviderError(
            ErrorKind.TRANSIENT, f"timeout {phase}", error_type="timeout", retryable=False
        )
    name = type(exc).__name__
    return ProviderError(ErrorKind.TRANSIENT, f"{phase}: {_describe(exc)}", error_type=name)


def _describe(exc: BaseException) -> str:
    """What went wrong, in words a client may see: aiohttp's own text can carry upstream
    addresses and parser internals, which belong in no error body."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "could not connect to the upstream"
    if isinstance(exc, aiohttp.ServerDisconnectedError | ConnectionResetError):
        return "the upstream closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the upstream response was cut short"
    return f"connection error ({type(exc).__name__})"


TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, ConnectionError)

STREAM_CUT = "stream ended without terminator"


def stream_cut() -> ProviderError:
    return ProviderError(ErrorKind.TRANSIENT, STREAM_CUT, error_type="stream_cut")


def mentions(message: str, markers: Iterable[str]) -> bool:
    lowered = message.lower()
    return any(marker in lowered for marker in markers)


def is_context_overflow(message: str) -> bool:
    return mentions(message, _CONTEXT_OVERFLOW_MARKERS)


def is_content_filtered(message: str) -> bool:
    return mentions(message, _CONTENT_FILTER_MARKERS)
