"""The Redis client of fleet mode: short timeouts, no retries, its own circuit breaker.

Redis must never make a request slow or fail (issue 15; LiteLLM #35273 is what happens
otherwise). So every call is bounded by `CALL_TIMEOUT_S`, the client never retries, and after
`FAILURES_TO_OPEN` consecutive failures a breaker makes every call fail at once with
`SharedStateDown` — callers then use their local fallback. A background loop pings Redis every
`PROBE_INTERVAL_S` whatever the breaker says: the first successful ping closes it again, so a
returning Redis is noticed within about a second with no request paying for the probe. Startup
never waits for Redis: the loop simply starts with the breaker closed and finds out.

`up` is what `/ready` (degraded) and the `fleet_shared_state_up` gauge show.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from rom_agent.logs import get_logger

log = get_logger("rom_agent.fleet")

T = TypeVar("T")

CALL_TIMEOUT_S = 0.05  # tens of ms: Redis on the same network answers in well under 1 ms
# Calls off the request path (release, renewal, heartbeat, publish, probe) may wait longer: on
# a busy machine a 50 ms bound there mistook our own slow event loop for a Redis outage.
BACKGROUND_TIMEOUT_S = 0.25
# Our own event loop's recent lateness is added to the bound: a timeout must mean "Redis did
# not answer", not "this process was too busy to read the answer" (which, on a loaded
# machine, sent whole bursts to the local fallback while Redis answered in a millisecond).
LAG_SAMPLE_INTERVAL_S = 0.05
MAX_LAG_ALLOWANCE_S = 0.45
# Consecutive failures (calls or probes) before Redis counts as down: one slow answer on a
# busy machine is not an outage, a stalled Redis fails every call.
FAILURES_TO_OPEN = 3
PROBE_INTERVAL_S = 1.0
POOL_SIZE = 16


class SharedStateDown(Exception):
    """Redis is unreachable, stalled or its breaker is open: use the local fallback."""


class SharedState:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "rom-agent:",
        call_timeout_s: float = CALL_TIMEOUT_S,
        on_error: Callable[[str], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        client: Redis | None = None,
    ) -> None:
        self.prefix = prefix
        self._url = url
        self._timeout = call_timeout_s
        self._background_timeout = max(call_timeout_s, BACKGROUND_TIMEOUT_S)
        self._on_error = on_error
        self._monotonic = monotonic
        self._failures = 0
        self._last_failure_at = float("-inf")
        self._open = False
        self.up = True  # optimistic until the first probe says otherwise; startup never waits
        self.last_change = monotonic()
        self._probe: asyncio.Task[None] | None = None
        self._lag_task: asyncio.Task[None] | None = None
        self._lags: collections.deque[float] = collections.deque(
            maxlen=int(1 / LAG_SAMPLE_INTERVAL_S)
        )
        self._listeners: list[Callable[[bool], None]] = []
        self.client = client if client is not None else self._new_client()

    def _new_client(self) -> Redis:
        pool = BlockingConnectionPool.from_url(
            self._url,
            max_connections=POOL_SIZE,
            timeout=self._timeout,  # waiting for a free pooled connection is bounded too
            socket_timeout=max(self._timeout, BACKGROUND_TIMEOUT_S),
            socket_connect_timeout=self._timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        return Redis(connection_pool=pool)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def pubsub_client(self) -> Redis:
        """A client for one pub/sub connection: blocking reads wait for messages, so only the
        connect is bounded; the subscriber notices a dead connection by its error."""
        return Redis.from_url(
            self._url,
            socket_connect_timeout=max(self._timeout, 0.5),
            socket_timeout=None,
            retry=Retry(NoBackoff(), 0),
        )

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """Called with the new `up` value whenever it changes (recovery, outage)."""
        self._listeners.append(listener)

    # ------------------------------------------------------------------ calls

    async def call(
        self,
        operation: str,
        command: Callable[[Redis], Awaitable[T]],
        *,
        background: bool = False,
    ) -> T:
        """Run `command` against Redis within the timeout (`BACKGROUND_TIMEOUT_S` for calls
        off the request path); `SharedStateDown` if it cannot."""
        if self._open:
            raise SharedStateDown(operation)
        started = self._monotonic()
        bound = self._background_timeout if background else self._timeout
        try:
            async with asyncio.timeout(bound + self._loop_lag()):
                result = await command(self.client)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(operation, exc, started)
            raise SharedStateDown(operation) from None
        self._failures = 0
        return result

    def _failed(self, operation: str, exc: BaseException, started: float) -> None:
        if self._on_error is not None:
            self._on_error(operation)
        if started < self._last_failure_at:
            # In flight together with a failure already counted: one burst of concurrent
            # calls timing out at once (a busy event loop) is one failure, not ten.
            return
        self._last_failure_at = self._monotonic()
        self._failures += 1
        if self._failures >= FAILURES_TO_OPEN and not self._open:
            self._open = True
            self._set_up(False, reason=f"{operation}: {type(exc).__name__}")

    def _set_up(self, up: bool, *, reason: str = "") -> None:
        if up == self.up:
            return
        self.up = up
        self.last_change = self._monotonic()
        if up:
            log.info("shared state (Redis) is back: fleet coordination resumed")
        else:
            log.warning(
                "shared state (Redis) is DOWN: degraded, using local fallbacks", reason=reason
            )
        for listener in self._listeners:
            try:
                listener(up)
            except Exception:
                log.exception("shared state listener failed")

    # ------------------------------------------------------------------ probe loop

    async def probe_once(self) -> bool:
        """One ping outside the breaker; closes or opens it. True if Redis answered."""
        started = self._monotonic()
        try:
            async with asyncio.timeout(self._background_timeout):
                await self.client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("ping", exc, started)
            return False
        self._failures = 0
        self._open = False
        self._set_up(True)
        return True

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._probe = loop.create_task(self._probe_loop())
        self._lag_task = loop.create_task(self._lag_loop())

    def _loop_lag(self) -> float:
        """The worst lateness of this event loop over the last second, capped."""
        return min(max(self._lags, default=0.0), MAX_LAG_ALLOWANCE_S)

    async def _lag_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + LAG_SAMPLE_INTERVAL_S
            await asyncio.sleep(LAG_SAMPLE_INTERVAL_S)
            self._lags.append(max(0.0, loop.time() - expected))

    async def _probe_loop(self) -> None:
        while True:
            await self.probe_once()
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def close(self) -> None:
        for task in (self._probe, self._lag_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(Exception):
            await self.client.aclose(close_connection_pool=True)

    def snapshot(self) -> dict[str, Any]:
        return {
            "configured": True,
            "up": self.up,
            "breaker": "OPEN" if self._open else "CLOSED",
            "sinceS": round(self._monotonic() - self.last_change, 3),
        }
