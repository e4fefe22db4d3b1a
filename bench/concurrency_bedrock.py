"""200 concurrent ConverseStream calls against a fake Bedrock that takes 1 s to answer.

If anything serialised the calls (a connection-pool cap, a thread pool, a lock) the wall time
would be a multiple of the upstream latency; with one uncapped aiohttp pool it stays ~1 s.

    .venv/bin/python bench/concurrency_bedrock.py [--streams 200] [--latency-ms 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `tests.fakes`


async def run(streams: int, latency_s: float) -> None:
    from botocore.credentials import Credentials
    from tests.fakes.bedrock_server import FakeBedrock

    from rom_agent.domain.messages import (
        ChatRequest,
        Message,
        StopEvent,
    )
    from rom_agent.providers.bedrock import BedrockProvider

    async with FakeBedrock(delay_s=latency_s, record=False) as fake:
        provider = BedrockProvider(
            region="us-east-1",
            endpoint_url=fake.url,
            credentials_resolver=lambda: Credentials("bench", "bench"),  # dummy, local only
        )
        request = ChatRequest(
            model="anthropic.claude-3-5-haiku-20241022-v1:0",
            messages=[Message.text("user", "Hello")],
            timeout_s=30,
        )

        async def one() -> float:
            started = time.perf_counter()
            last = None
            async for event in provider.stream(request):
                last = event
            assert isinstance(last, StopEvent), last
            return time.perf_counter() - started

        try:
            started = time.perf_counter()
            latencies = await asyncio.gather(*(one() for _ in range(streams)))
            wall = time.perf_counter() - started
        finally:
            await provider.aclose()

    print(f"streams:            {streams}")
    print(f"upstream latency:   {latency_s:.3f} s")
    print(f"wall time:          {wall:.3f} s")
    print(f"per-stream p50/max: {statistics.median(latencies):.3f} / {max(latencies):.3f} s")
    print(f"max in flight:      {fake.max_in_flight} (requests seen: {fake.request_count})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, default=1000.0)
    args = parser.parse_args()
    asyncio.run(run(args.streams, args.latency_ms / 1000))


if __name__ == "__main__":
    main()
