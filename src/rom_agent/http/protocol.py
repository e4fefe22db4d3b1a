"""uvicorn's httptools protocol with the limits it lacks: header size, slow headers, and the
SPEC error body for what its parser rejects.

httptools has no header-size limit (h11 has one, at about four times the CPU per request), and
uvicorn bounds only the idle time between requests on a keep-alive connection. This subclass
counts the bytes of the request line and headers (431 beyond `MAX_HEADER_BYTES`), gives a
connection `HEADER_TIMEOUT_S` to deliver complete headers, from its opening or from the first
byte of a pipelined request (408), and answers a malformed request with the JSON error body
instead of uvicorn's plain text. Each rejection closes the connection. A slow body is bounded
by `BODY_TIMEOUT_S` where the body is read (`http/requests.py`).
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rom_agent.config import Settings
from rom_agent.http.errors import error_body

# The bytes a header line costs beyond its name and value: ": " and CRLF.
_HEADER_LINE_OVERHEAD = 4


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    max_header_bytes = 32 * 1024
    header_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_bytes = 0
        self._rejected = False
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._rejected:  # after a rejection the connection is closing: ignore the rest
            super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + _HEADER_LINE_OVERHEAD)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        if not self._rejected:
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._rejected:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._rejected:
            super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request its parser rejects, in our error body."""
        self._reject(HTTPStatus.BAD_REQUEST, "INVALID_REQUEST", "malformed HTTP request")

    # ------------------------------------------------------------------ limits

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.max_header_bytes and not self._rejected:
            self._reject(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                "HEADERS_TOO_LARGE",
                f"request line and headers exceed {self.max_header_bytes} bytes",
            )

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request is late while the previous one is answered: do not write
            # into that response; close once it is done.
            self.cycle.keep_alive = False
            return
        self._reject(
            HTTPStatus.REQUEST_TIMEOUT,
            "REQUEST_TIMEOUT",
            f"request headers not received within {self.header_timeout_s:g} s",
        )

    def _reject(self, status: HTTPStatus, code: str, message: str) -> None:
        self._rejected = True
        self._disarm_header_timer()
        body = error_body(status.value, code, message)
        self.transport.write(
            b"".join(
                [
                    f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode(),
                    b"content-type: application/json\r\n",
                    b"content-length: " + str(len(body)).encode() + b"\r\n",
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        self.transport.close()


def protocol_for(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """The protocol class with this configuration's limits (uvicorn takes a class)."""
    return type(
        "ConfiguredHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "max_header_bytes": settings.max_header_bytes,
            "header_timeout_s": settings.header_timeout_s,
        },
    )
