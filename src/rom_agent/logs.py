"""Structured logging: JSON lines by default, `console` for humans; request id on every line.

The request id lives in a contextvar bound by the HTTP middleware, so every line logged while a
request runs carries it without being passed around. Secrets are never passed to the logger.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime as dt
import logging
import sys
from typing import BinaryIO

import orjson
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    numeric = _LEVELS[level]
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "console":
        renderer: structlog.typing.Processor = structlog.dev.ConsoleRenderer(colors=False)
        factory: structlog.typing.WrappedLogger = structlog.PrintLoggerFactory(sys.stderr)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory = structlog.BytesLoggerFactory(sys.stderr.buffer)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Third-party stdlib loggers (uvicorn, asyncio) go through the same processors, so a JSON
    # log stays one JSON object per line whoever wrote it.
    if fmt == "console":
        stdlib_renderer: structlog.typing.Processor = renderer
    else:
        stdlib_renderer = structlog.processors.JSONRenderer(
            serializer=lambda event, **_: orjson.dumps(event).decode()
        )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                stdlib_renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    if fmt == "json":
        ACCESS_LOG.direct(sys.stderr.buffer, enabled=numeric <= logging.INFO)
    else:
        ACCESS_LOG.through_structlog()


class AccessLog:
    """The one line per HTTP request (`event: request`), at info level.

    It is the only line logged on every request, and going through structlog's processor chain
    cost ~4 % of a request's CPU (py-spy, bench/profile.py at LOG_LEVEL=info). In JSON mode it
    is rendered here in one orjson call with the keys and timestamp format of the structlog
    lines, and written in batches: lines wait in a list and go out in one write at the end of
    the event-loop iteration that produced them (order kept; at most one iteration's lines
    are lost if the process dies hard). The console format, and an app whose logging was
    never configured (tests, embedding), keep going through structlog."""

    def __init__(self) -> None:
        self._stream: BinaryIO | None = None  # None: through structlog
        self._enabled = True
        self._pending: list[bytes] = []
        self._fallback = structlog.get_logger("rom_agent.http")

    def direct(self, stream: BinaryIO, *, enabled: bool) -> None:
        self.flush()
        self._stream, self._enabled = stream, enabled

    def through_structlog(self) -> None:
        self.flush()
        self._stream, self._enabled = None, True

    def request(
        self, method: str, path: str, status: int, duration_ms: float, request_id: str
    ) -> None:
        if self._stream is None:
            self._fallback.info(
                "request",
                method=method,
                path=path,
                status=status,
                duration_ms=duration_ms,
                request_id=request_id,
            )
            return
        if not self._enabled:
            return
        line: dict[str, object] = {
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": duration_ms,
            "event": "request",
            "request_id": request_id,
        }
        # What the request bound (trace_id, span_id...), as structlog's merge_contextvars does.
        for key, value in structlog.contextvars.get_contextvars().items():
            line.setdefault(key, value)
        line["level"] = "info"
        line["timestamp"] = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
        self._pending.append(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
        if len(self._pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop running: nothing to batch with
                self.flush()

    def flush(self) -> None:
        if not self._pending or self._stream is None:
            return
        lines, self._pending = b"".join(self._pending), []
        self._stream.write(lines)
        self._stream.flush()


ACCESS_LOG = AccessLog()
atexit.register(ACCESS_LOG.flush)


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
