"""Overhead of the resilience pipeline per model call, with an instant in-memory provider.

    .venv/bin/python bench/pipeline_overhead.py [--calls 20000] [--rounds 7]

Prints µs per `Pipeline.complete()` (and per streamed call) with every protection on versus
every protection off, next to the bare provider call, as the median of several rounds; and the
stream failover machinery (continuation and hedging, issue 16) armed but not triggered versus
switched off. `--chunks` sets the text deltas per stream. The
provider answers without awaiting anything, so the figures are the pipeline's own cost:
breaker permit, retry-budget bookkeeping, the attempt timeout, metrics and the fallback walk.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from rom_agent.config import load_settings
from rom_agent.domain.events import Events
from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    Message,
    StopEvent,
    StreamEvent,
    TextBlock,
    TextDelta,
    Usage,
    UsageEvent,
)
from rom_agent.flags import FlagStore
from rom_agent.instrumentation.prometheus import PrometheusMetrics
from rom_agent.resilience.breaker import BreakerRegistry
from rom_agent.resilience.clock import SystemClock
from rom_agent.resilience.pipeline import ModelCall, Pipeline

MODELS = ("rom-sim-1", "rom-sim-2")
ALL_ON = {
    "enable_retry": True,
    "enable_circuit_breaker": True,
    "enable_metrics": True,
    "enable_fault_injection": True,
}
ALL_OFF = dict.fromkeys(ALL_ON, False)
FAILOVER_OFF = {**ALL_ON, "enable_stream_continuation": False, "enable_hedging": False}
FAILOVER_ARMED = {**ALL_ON, "enable_stream_continuation": True, "enable_hedging": True}
CONTINUATION_ONLY = {**FAILOVER_OFF, "enable_stream_continuation": True}
CHUNKS = 2


class InstantProvider:
    name = "simulator"

    def __init__(self) -> None:
        self._usage = Usage(12, 34)

    async def complete(self, request: ChatRequest) -> ChatResponse:
        return ChatResponse(request.model, (TextBlock("ok"),), "end_turn", self._usage)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        for _ in range(CHUNKS):
            yield TextDelta("ok ")
        yield UsageEvent(self._usage)
        yield StopEvent("end_turn")

    async def aclose(self) -> None:
        pass


def build(flags: dict[str, bool]) -> tuple[Pipeline, ModelCall]:
    store = FlagStore(load_settings(_env_file=None, **flags))
    clock = SystemClock(seed=1)
    metrics = PrometheusMetrics(lambda: store.current.enable_metrics, MODELS)
    events = Events()
    metrics.listen(events, store)
    breakers = BreakerRegistry(store, clock, events)
    metrics.breaker_source = breakers
    pipeline = Pipeline(store, {"simulator": InstantProvider()}, breakers, events, clock)
    call = ModelCall(
        messages=(Message.text("user", "hello"),),
        chain=pipeline.chain,
        deadline=clock.now() + 10**9,  # a deadline that never binds, as REQUEST_TIMEOUT_S
    )
    return pipeline, call


async def batch_us(fn: Callable[[], Awaitable[object]], calls: int) -> float:
    # CPU time of this process, not wall time: on a shared machine the wall clock measures
    # the neighbours too.
    start = time.process_time()
    for _ in range(calls):
        await fn()
    return (time.process_time() - start) / calls * 1e6


async def main(calls: int, rounds: int) -> None:
    provider = InstantProvider()
    request = ChatRequest("rom-sim-1", (Message.text("user", "hello"),))

    async def bare() -> object:
        return await provider.complete(request)

    async def bare_stream() -> object:
        return [event async for event in provider.stream(request)]

    variants: list[tuple[str, Callable[[], Awaitable[object]], Callable[[], Awaitable[object]]]]
    variants = [("provider alone", bare, bare_stream)]
    flag_sets = (
        ("pipeline, all flags off", ALL_OFF),
        ("pipeline, all flags on", ALL_ON),
        ("all on, failover off", FAILOVER_OFF),
        ("all on, continuation armed", CONTINUATION_ONLY),
        ("all on, failover armed", FAILOVER_ARMED),
    )
    for label, flags in flag_sets:
        pipeline, call = build(flags)

        async def complete(pipeline: Pipeline = pipeline, call: ModelCall = call) -> object:
            return await pipeline.complete(call)

        async def stream(pipeline: Pipeline = pipeline, call: ModelCall = call) -> object:
            return [item async for item in pipeline.stream(call)]

        variants.append((label, complete, stream))

    for _, complete, stream in variants:  # warm up label caches and the allocator
        await batch_us(complete, min(calls, 2000))
        await batch_us(stream, min(calls, 2000))
    # Rounds interleave the variants, so drift in the machine's load hits all of them; the
    # minimum over rounds is the least disturbed estimate of each one's own cost.
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in variants}
    for _ in range(rounds):
        for label, complete, stream in variants:
            samples[label].append((await batch_us(complete, calls), await batch_us(stream, calls)))

    print(f"{calls} calls x {rounds} rounds, {CHUNKS} text deltas per stream, min CPU µs per call")
    print(f"{'':26} {'complete()':>12} {'stream()':>12}")
    for label, values in samples.items():
        complete_us = min(v[0] for v in values)
        stream_us = min(v[1] for v in values)
        print(f"{label:26} {complete_us:12.1f} {stream_us:12.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--chunks", type=int, default=CHUNKS)
    args = parser.parse_args()
    CHUNKS = args.chunks
    asyncio.run(main(args.calls, args.rounds))
