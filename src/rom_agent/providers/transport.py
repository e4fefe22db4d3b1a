"""The HTTP providers' template and plumbing: one pooled aiohttp session, timeouts, the
post → status → decode → cut skeleton every HTTP provider shares (`HttpProvider`).

Providers own exactly one `ClientSession` each, created lazily inside the running loop. The
connector has no connection cap (`limit=0`): concurrency is bounded by our admission control,
never by a hidden pool queue. aiohttp does not retry POSTs, and nothing here retries either.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass

import aiohttp
import orjson
from yarl import URL

from rom_agent.domain.errors import (
    ErrorKind,
    ProviderError,
)
from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    StreamEvent,
)
from rom_agent.instrumentation.propagation import with_trace_headers

# Used when a request carries no `timeout_s`; the resilience layer normally always sets one.
DEFAULT_TIMEOUT_S = 60.0

# Prose is the last resort of the error taxonomy: read only when the upstream gave no
# specific code or exception name (vLLM's `BadRequestError`, Bedrock's catch-all
# `ValidationException`, Ollama's bare string). Phrases upstreams use when the prompt does not
# fit the model — specific ones: a bare "too long" also says "string too long", a request
# error every model would refuse. Plain substring checks on the lower-cased message.
_CONTEXT_OVERFLOW_MARKERS = (
    "prompt is too long",  # Anthropic (direct and on Bedrock)
    "input is too long",  # Bedrock
    "maximum context length",  # OpenAI, vLLM
    "context length",
    "context window",
    "context_length",
    "context limit",
    "available context size",  # llama.cpp
    "too many tokens",
    "too many input tokens",
)
_CONTENT_FILTER_MARKERS = (
    "content filter",
    "content_filter",
    "content management policy",  # Azure OpenAI
    "content policy",
    "usage policy",
    "filtering policy",
)
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def safe_label(value: object) -> str | None:
    """An upstream error code fit for a client-facing message (a short identifier), or None:
    anything else the upstream sent stays in the log."""
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        return None
    return value if set(value) <= _LABEL_CHARS else None


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

STREAM_CUT = "the stream ended before the answer was complete"


def stream_cut(message: str = STREAM_CUT) -> ProviderError:
    return ProviderError(ErrorKind.TRANSIENT, message, error_type="stream_cut")


def mentions(message: str, markers: Iterable[str]) -> bool:
    lowered = message.lower()
    return any(marker in lowered for marker in markers)


def is_context_overflow(message: str) -> bool:
    return mentions(message, _CONTEXT_OVERFLOW_MARKERS)


def is_content_filtered(message: str) -> bool:
    return mentions(message, _CONTENT_FILTER_MARKERS)


# --------------------------------------------------------------------------- the template


@dataclass(frozen=True, slots=True)
class PreparedCall:
    """One upstream HTTP request, ready to send."""

    url: URL
    body: bytes
    headers: Mapping[str, str] | None = None


class StreamDecoding(ABC):
    """How one provider reads one streamed answer (a fresh object per stream)."""

    # Exceptions meaning "the upstream sent something that is not its protocol".
    malformed: tuple[type[BaseException], ...] = (
        KeyError,
        IndexError,
        TypeError,
        ValueError,
        AttributeError,
    )

    @abstractmethod
    def events(self, response: aiohttp.ClientResponse) -> AsyncGenerator[StreamEvent, None]:
        """The content events of the body, up to the protocol's end (not the ending)."""

    @property
    @abstractmethod
    def answer_complete(self) -> bool:
        """The terminator was seen: a transport error after it loses nothing."""

    @abstractmethod
    def ending(self) -> list[StreamEvent]:
        """`UsageEvent` and `StopEvent` once the body ended; raises a stream cut if the
        answer was not complete."""


class HttpProvider(ABC):
    """One call = one HTTP POST. Subclasses say how to build it and how to read answers."""

    name: str
    _session: SessionHolder

    @abstractmethod
    async def prepare(self, request: ChatRequest, *, stream: bool) -> PreparedCall: ...

    @abstractmethod
    async def read_error(self, response: aiohttp.ClientResponse) -> ProviderError:
        """A non-200 response → the classified error."""

    @abstractmethod
    def decode(self, request: ChatRequest, raw: bytes) -> ChatResponse: ...

    @abstractmethod
    def stream_decoding(self, request: ChatRequest) -> StreamDecoding: ...

    async def complete(self, request: ChatRequest) -> ChatResponse:
        call = await self.prepare(request, stream=False)
        try:
            async with self._session.get().post(
                call.url,
                data=call.body,
                headers=with_trace_headers(call.headers),
                timeout=call_timeout(request.timeout_s),
            ) as response:
                if response.status != 200:
                    raise await self.read_error(response)
                raw = await response.read()
        except TRANSPORT_ERRORS as exc:
            raise transport_error(exc, phase=f"calling {self.name}") from exc
        return self.decode(request, raw)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        call = await self.prepare(request, stream=True)
        decoding = self.stream_decoding(request)
        phase = f"calling {self.name}"
        try:
            async with self._session.get().post(
                call.url,
                data=call.body,
                headers=with_trace_headers(call.headers),
                timeout=stream_timeout(request.timeout_s),
            ) as response:
                if response.status != 200:
                    raise await self.read_error(response)
                phase = "reading stream"
                async with aclosing(decoding.events(response)) as events:
                    async for event in events:
                        yield event
        except TRANSPORT_ERRORS as exc:
            if not decoding.answer_complete:  # after the terminator nothing can be lost
                raise transport_error(exc, phase=phase) from exc
        except decoding.malformed as exc:
            raise ProviderError(
                ErrorKind.TRANSIENT,
                f"malformed stream from {self.name} ({type(exc).__name__})",
                error_type="malformed_stream",
                detail=str(exc),
            ) from exc
        for event in decoding.ending():
            yield event

    async def aclose(self) -> None:
        await self._session.aclose()
