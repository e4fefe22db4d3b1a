"""Structured logging: JSON lines by default, `console` for humans; request id on every line.

The request id lives in a contextvar bound by the HTTP middleware, so every line logged while a
request runs carries it without being passed around. Secrets are never passed to the logger.
"""

from __future__ import annotations

import logging
import sys

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


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
