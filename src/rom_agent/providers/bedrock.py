"""AWS Bedrock Converse / ConverseStream over aiohttp, signed with botocore's SigV4 signer.

Why not boto3: its HTTP stack is synchronous (a thread per in-flight call) and retries on its
own. Here botocore only signs requests and decodes eventstream frames; the I/O is one pooled
aiohttp session, so 200 concurrent streams are 200 sockets on one loop, and one call is
exactly one HTTP request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import orjson
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials, RefreshableCredentials
from botocore.eventstream import EventStreamBuffer, EventStreamMessage, ParserError
from botocore.exceptions import BotoCoreError
from yarl import URL

from rom_agent.domain.errors import (
    CONTENT_FILTER,
    CONTEXT_LENGTH_EXCEEDED,
    ErrorKind,
    ProviderError,
)
from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    StopEvent,
    StreamEvent,
    TextDelta,
    ToolUseBlock,
    ToolUseEvent,
    Usage,
    UsageEvent,
)
from rom_agent.domain.options import GenerationOptions
from rom_agent.providers.base import (
    classify_status,
    parse_retry_after,
)
from rom_agent.providers.bedrock_converse import (
    check_converse_stop_reason,
    converse_unsupported_options,
    converse_usage,
    decode_converse_response,
    encode_converse_request,
)
from rom_agent.providers.transport import (
    HttpProvider,
    PreparedCall,
    SessionHolder,
    StreamDecoding,
    is_content_filtered,
    is_context_overflow,
    mentions,
    safe_label,
    stream_cut,
)

if TYPE_CHECKING:
    from rom_agent.config import Settings

CredentialsResolver = Callable[[], Credentials | None]

_SERVICE = "bedrock"
_EVENTSTREAM = "application/vnd.amazon.eventstream"

# Exception names (lower-cased: HTTP uses PascalCase, in-stream frames lowerCamel) → kind.
_TRANSIENT_TYPES = frozenset(
    {
        "throttlingexception",
        "serviceunavailableexception",
        "internalserverexception",
        "modelnotreadyexception",
        "modeltimeoutexception",
        "modelstreamerrorexception",
        "modelerrorexception",
    }
)
_MODEL_TYPES = frozenset(
    {
        "resourcenotfoundexception",
        "accessdeniedexception",
        "servicequotaexceededexception",
        "unrecognizedclientexception",
        "expiredtokenexception",
    }
)
# Validation errors about what *this model* supports: another model may well serve the request.
_MODEL_VALIDATION_MARKERS = (
    "model identifier",
    "doesn't support",
    "does not support",
    "on-demand throughput",
)


def default_credentials() -> Credentials | None:
    """The standard AWS chain (env, shared files, SSO, container/instance roles)."""
    import botocore.session

    return botocore.session.Session().get_credentials()


class BedrockProvider(HttpProvider):
    """`complete()` = Converse, `stream()` = ConverseStream. One call, one HTTP request."""

    name = "bedrock"

    def __init__(
        self,
        *,
        region: str,
        endpoint_url: str | None = None,
        credentials_resolver: CredentialsResolver = default_credentials,
    ) -> None:
        self._region = region
        self._endpoint = (endpoint_url or f"https://bedrock-runtime.{region}.amazonaws.com").rstrip(
            "/"
        )
        self._resolve_credentials = credentials_resolver
        self._credentials: Credentials | None = None
        self._credentials_lock = asyncio.Lock()
        self._session = SessionHolder()
        self._urls: dict[str, tuple[str, str]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> BedrockProvider:
        return cls(region=settings.aws_region, endpoint_url=settings.bedrock_endpoint_url)

    # ------------------------------------------------------------------ the template

    def unsupported(self, options: GenerationOptions) -> list[str]:
        return converse_unsupported_options(options)

    def decode(self, request: ChatRequest, raw: bytes) -> ChatResponse:
        return decode_converse_response(request.model, raw)

    async def read_error(self, response: aiohttp.ClientResponse) -> ProviderError:
        return await _error_from_response(response)

    def stream_decoding(self, request: ChatRequest) -> StreamDecoding:
        return EventStreamDecoding()

    # ------------------------------------------------------------------ signing

    async def prepare(self, request: ChatRequest, *, stream: bool) -> PreparedCall:
        urls = self._urls.get(request.model)
        if urls is None:
            base = f"{self._endpoint}/model/{quote(request.model, safe='')}"
            urls = self._urls[request.model] = (f"{base}/converse", f"{base}/converse-stream")
        url = urls[1] if stream else urls[0]
        body = orjson.dumps(encode_converse_request(request))
        aws_request = AWSRequest(
            method="POST",
            url=url,
            data=body,
            headers={
                "Content-Type": "application/json",
                "Accept": _EVENTSTREAM if stream else "application/json",
            },
        )
        SigV4Auth(await self._frozen_credentials(), _SERVICE, self._region).add_auth(aws_request)
        return PreparedCall(URL(url, encoded=True), body, dict(aws_request.headers.items()))

    async def _frozen_credentials(self) -> ReadOnlyCredentials:
        credentials = self._credentials
        if credentials is None:
            async with self._credentials_lock:
                if self._credentials is None:
                    # The chain may read files or call the instance metadata service: off-loop,
                    # once. A failed lookup is not cached, so a fixed environment recovers.
                    self._credentials = await asyncio.to_thread(self._resolve_credentials)
                credentials = self._credentials
            if credentials is None:
                raise ProviderError(
                    ErrorKind.MODEL, "no AWS credentials found", error_type="NoCredentials"
                )
        try:
            if isinstance(credentials, RefreshableCredentials) and credentials.refresh_needed():
                return await asyncio.to_thread(credentials.get_frozen_credentials)
            return credentials.get_frozen_credentials()
        except BotoCoreError as exc:
            raise ProviderError(
                ErrorKind.TRANSIENT,
                "refreshing AWS credentials failed",
                error_type=type(exc).__name__,
                detail=str(exc),
            ) from exc


# --------------------------------------------------------------------------- stream decoding


class EventStreamDecoding(StreamDecoding):
    """A ConverseStream body: botocore reassembles eventstream frames from aiohttp's
    arbitrary chunks and checks their CRCs; a bad frame is a malformed stream."""

    malformed = (ParserError, *StreamDecoding.malformed)

    def __init__(self) -> None:
        self.decoder = StreamDecoder()

    async def events(self, response: aiohttp.ClientResponse) -> AsyncGenerator[StreamEvent, None]:
        decoder = self.decoder
        frames = EventStreamBuffer()
        async for chunk in response.content.iter_any():
            frames.add_data(chunk)
            for message in frames:
                event = decoder.handle(message)
                if event is not None:
                    yield event
            if decoder.complete:
                break  # metadata after messageStop: nothing else is coming

    @property
    def answer_complete(self) -> bool:
        # After messageStop the answer is whole; only the trailing metadata can be lost.
        return self.decoder.stop_reason is not None

    def ending(self) -> list[StreamEvent]:
        decoder = self.decoder
        if decoder.stop_reason is None:
            raise stream_cut("the stream ended without messageStop")
        return [UsageEvent(decoder.usage), StopEvent(decoder.stop_reason)]


class StreamDecoder:
    """ConverseStream events → our stream events. Tool input arrives as JSON fragments."""

    __slots__ = ("_tools", "complete", "stop_reason", "usage")

    def __init__(self) -> None:
        self._tools: dict[int, tuple[str, str, list[str]]] = {}
        self.complete = False  # metadata after messageStop: the last frame Bedrock sends
        self.stop_reason: str | None = None
        self.usage = Usage()

    def handle(self, message: EventStreamMessage) -> StreamEvent | None:
        headers = message.headers
        message_type = headers.get(":message-type")
        if message_type != "event":
            raise _stream_exception(message)
        event_type = headers.get(":event-type")
        payload = orjson.loads(message.payload) if message.payload else {}
        if event_type == "contentBlockDelta":
            delta = payload["delta"]
            if "text" in delta:
                return TextDelta(delta["text"]) if delta["text"] else None
            if "toolUse" in delta:
                self._tools[payload["contentBlockIndex"]][2].append(delta["toolUse"]["input"])
            return None
        if event_type == "contentBlockStart":
            tool = payload.get("start", {}).get("toolUse")
            if tool is not None:
                self._tools[payload["contentBlockIndex"]] = (tool["toolUseId"], tool["name"], [])
            return None
        if event_type == "contentBlockStop":
            pending = self._tools.pop(payload.get("contentBlockIndex", -1), None)
            if pending is None:
                return None
            return ToolUseEvent(ToolUseBlock(pending[0], pending[1], _tool_input(pending[2])))
        if event_type == "messageStop":
            self.stop_reason = payload.get("stopReason") or "end_turn"
            check_converse_stop_reason(self.stop_reason)
        elif event_type == "metadata":
            self.usage = converse_usage(payload.get("usage"))
            self.complete = self.stop_reason is not None
        return None  # messageStart and anything new


def _tool_input(fragments: Sequence[str]) -> dict[str, Any]:
    raw = "".join(fragments)
    if not raw:
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProviderError(
            ErrorKind.TRANSIENT, "malformed tool input in stream", error_type="malformed_stream"
        ) from exc
    return value if isinstance(value, dict) else {"value": value}


# --------------------------------------------------------------------------- errors


def classify(status: int | None, error_type: str, message: str) -> tuple[ErrorKind, str | None]:
    """(kind, canonical error type or None): Bedrock's exception names first, then the HTTP
    status; the prose only for `ValidationException`, Bedrock's catch-all for what a model
    refused (the context window, a feature this model lacks) and what any model would."""
    lowered = error_type.lower()
    if lowered in _TRANSIENT_TYPES:
        return ErrorKind.TRANSIENT, None
    if lowered in _MODEL_TYPES:
        return ErrorKind.MODEL, None
    if lowered == "validationexception" or (not lowered and status == 400):
        if is_context_overflow(message):
            return ErrorKind.MODEL, CONTEXT_LENGTH_EXCEEDED
        if is_content_filtered(message):
            return ErrorKind.POLICY, CONTENT_FILTER
        if mentions(message, _MODEL_VALIDATION_MARKERS):
            return ErrorKind.MODEL, None
        return ErrorKind.REQUEST, None
    if status is None:  # an unknown in-stream exception: the stream failed mid-way
        return ErrorKind.TRANSIENT, None
    return classify_status(status), None


async def _error_from_response(response: aiohttp.ClientResponse) -> ProviderError:
    status = response.status
    raw = await response.read()
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    message = str(data.get("message") or data.get("Message") or raw[:200].decode(errors="replace"))
    # `x-amzn-ErrorType: ThrottlingException:http://internal.amazon.com/coral/...`
    error_type = response.headers.get("x-amzn-ErrorType", "").partition(":")[0]
    if not error_type:
        error_type = str(data.get("__type", "")).rpartition("#")[2]
    kind, canonical = classify(status, error_type, message)
    label = canonical or safe_label(error_type) or "error"
    return ProviderError(
        kind,
        f"bedrock returned {status} ({label})",
        status=status,
        error_type=canonical or error_type or None,
        retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
        detail=message,
    )


def _stream_exception(message: EventStreamMessage) -> ProviderError:
    headers = message.headers
    error_type = headers.get(":exception-type") or headers.get(":error-code") or "unknown"
    try:
        text = orjson.loads(message.payload).get("message", "") if message.payload else ""
    except (orjson.JSONDecodeError, AttributeError):
        text = ""
    text = text or headers.get(":error-message") or error_type
    kind, canonical = classify(None, error_type, text)
    return ProviderError(
        kind,
        f"bedrock stream error ({canonical or safe_label(error_type) or 'error'})",
        error_type=canonical or error_type,
        detail=text,
    )
