"""The Redis client of fleet mode: short timeouts, no retries, its own circuit breaker.

Redis must never make a request slow or fail (issue 15; LiteLLM #35273 is what happens
otherwise). So every call is bounded by `CALL_TIMEOUT_S`, the client never retries, and after
`FAILURES_TO_OPEN` consecutive failures a breaker makes every call fail at once with
`SharedStateDown` — callers then use their local fallback. A background loop pings Redis every
`PROBE_INTERVAL_S` whatever the breaker says: the first successful ping closes it again, so a
returning Redis is noticed within about a second with no request paying for the probe. Startup
never waits for Redis: the loop simply starts with the breaker closed and finds out.

A request-path call that times out makes Redis *suspect* at once: the other request-path calls
in flight give up at that moment (their own bounds are moved to now), later ones skip Redis
without waiting (the local fallback), and a background ping decides — an answer clears the
suspicion, a failure opens the breaker. So a stalled Redis costs one bound per replica, not
one per request until three failures have been counted (issue 15: p99 added ≤ 20 ms).

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
from redis.exceptions import TimeoutError as RedisTimeoutError

from rom_agent.logs import get_logger

log = get_logger("rom_agent.fleet")

T = TypeVar("T")

# The request path's bound (admission). Redis on the same network answers in well under 1 ms;
# a stall costs this once per replica (then Redis is suspect, see above), so it is kept short.
CALL_TIMEOUT_S = 0.02
CONNECT_TIMEOUT_S = 0.05  # a new pooled connection, and waiting for a free one
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


# Slack on top of a request-path call's bound before Redis counts it as abandoned (see
# `deadline_ms`): covers the error of our estimate of Redis's clock.
DEADLINE_SLACK_S = 0.05
CLOCK_SAMPLE_MAX_AGE_S = 30.0


class SharedStateDown(Exception):
    """Redis is unreachable, stalled or its breaker is open: use the local fallback.

    `sent` says whether the command may have reached Redis (False: skipped without a call)."""

    def __init__(self, operation: str, *, sent: bool = False) -> None:
        super().__init__(operation)
        self.sent = sent


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError | RedisTimeoutError)


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
        # A request-path call timed out and the background ping that decides has not answered.
        self._suspect = False
        self._verdict: asyncio.Task[bool] | None = None
        self._in_flight: set[asyncio.Timeout] = set()  # bounds of request-path calls
        # (Redis clock in ms, our monotonic time, round trip) of the best recent TIME sample.
        self._clock_sample: tuple[float, float, float] | None = None
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
            timeout=CONNECT_TIMEOUT_S,  # waiting for a free pooled connection is bounded too
            socket_timeout=max(self._timeout, BACKGROUND_TIMEOUT_S),
            socket_connect_timeout=CONNECT_TIMEOUT_S,
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
        if background:
            return await self._background_call(operation, command)
        if self._suspect:  # an earlier request-path call timed out: do not wait behind it
            self.count_error(operation)
            raise SharedStateDown(operation)
        started = self._monotonic()
        bound = asyncio.timeout(self._timeout + self._loop_lag())
        try:
            async with bound:
                self._in_flight.add(bound)
                try:
                    result = await command(self.client)
                finally:
                    self._in_flight.discard(bound)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(operation, exc, started, request=True)
            raise SharedStateDown(operation, sent=True) from None
        self._succeeded()
        return result

    async def _background_call(self, operation: str, command: Callable[[Redis], Awaitable[T]]) -> T:
        started = self._monotonic()
        try:
            async with asyncio.timeout(self._background_timeout + self._loop_lag()):
                result = await command(self.client)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(operation, exc, started)
            raise SharedStateDown(operation, sent=True) from None
        self._succeeded()
        return result

    def _succeeded(self) -> None:
        self._failures = 0
        self._suspect = False

    def _failed(
        self, operation: str, exc: BaseException, started: float, *, request: bool = False
    ) -> None:
        self.count_error(operation)
        if request and self._suspect:
            return  # cut short by the first timeout: the background ping decides
        if request and _is_timeout(exc):
            self._suspected()
        if started < self._last_failure_at:
            # In flight together with a failure already counted: one burst of concurrent
            # calls timing out at once (a busy event loop) is one failure, not ten.
            return
        self._last_failure_at = self._monotonic()
        self._failures += 1
        # While suspect, a failed background call confirms it: a stalled Redis is gone, not
        # flaky (and requests are already skipping it).
        if (self._failures >= FAILURES_TO_OPEN or (self._suspect and not request)) and not (
            self._open
        ):
            self._open = True
            self._set_up(False, reason=f"{operation}: {type(exc).__name__}")

    def _suspected(self) -> None:
        """A request-path call timed out: fail the others in flight now, skip Redis on the
        request path from now on, and let one background ping decide."""
        self._suspect = True
        now = asyncio.get_running_loop().time()
        for bound in self._in_flight:
            if not bound.expired():
                bound.reschedule(now)
        if self._verdict is None or self._verdict.done():
            self._verdict = asyncio.get_running_loop().create_task(self.probe_once())

    @property
    def suspect(self) -> bool:
        return self._suspect

    def count_error(self, operation: str) -> None:
        if self._on_error is not None:
            self._on_error(operation)

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
        """One ping (a TIME, which also samples Redis's clock) outside the breaker; closes or
        opens it. True if Redis answered."""
        started = self._monotonic()
        try:
            async with asyncio.timeout(self._background_timeout + self._loop_lag()):
                seconds, micros = await self.client.time()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("ping", exc, started)
            return False
        self._sample_clock(int(seconds) * 1000 + int(micros) / 1000, started)
        self._succeeded()
        self._open = False
        self._set_up(True)
        return True

    def _sample_clock(self, redis_ms: float, sent: float) -> None:
        received = self._monotonic()
        rtt = received - sent
        best = self._clock_sample
        if best is None or rtt <= best[2] or received - best[1] > CLOCK_SAMPLE_MAX_AGE_S:
            self._clock_sample = (redis_ms, (sent + received) / 2, rtt)

    def deadline_ms(self) -> int:
        """Redis's clock (estimated from the probes' TIME) by which a request-path call sent
        now has certainly been given up; 0 when not known yet. A script that finds itself
        past it must do nothing: its caller has already fallen back (after a stall, Redis
        runs every buffered command at once)."""
        sample = self._clock_sample
        if sample is None:
            return 0
        redis_ms, at, rtt = sample
        late_s = self._timeout + self._loop_lag() + DEADLINE_SLACK_S + rtt
        return int(redis_ms + (self._monotonic() - at + late_s) * 1000)

    def forget_clock(self) -> None:
        """A script refused a deadline its caller had not reached: re-sample the clock."""
        self._clock_sample = None

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
        for task in (self._probe, self._lag_task, self._verdict):
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
            "breaker": "OPEN" if self._open else "SUSPECT" if self._suspect else "CLOSED",
            "sinceS": round(self._monotonic() - self.last_change, 3),
        }
