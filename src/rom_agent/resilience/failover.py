"""A streamed model turn with failover on both sides of the commit point.

Before the first token: the attempt walk, with the slow model's attempt hedged by the next model
(`hedge.open_hedged`). After it: the committed stream, and when it breaks in a way a model can
repair, its continuation (`continuation.Continuation`) — same model first, then the rest of the
chain — forwarding only text the client has not received. The client sees `StreamStart` (again
when another model takes over), content and usage events, and the terminator last; or
`StreamInterruptedError` when no model could finish the answer.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

from rom_agent.domain.messages import StreamEvent, TextDelta, ToolUseEvent
from rom_agent.resilience.attempts import AttemptRunner
from rom_agent.resilience.calls import ModelCall, StreamItem, StreamStart
from rom_agent.resilience.continuation import Continuation, Diverged, StreamProgress
from rom_agent.resilience.errors import StreamInterruptedError
from rom_agent.resilience.fallback import ChainRun
from rom_agent.resilience.hedge import Hedging, open_hedged
from rom_agent.resilience.stream import CommittedStream


async def run_stream(
    runner: AttemptRunner, hedging: Hedging, call: ModelCall
) -> AsyncGenerator[StreamItem, None]:
    """`StreamStart`, then the answer's events (see `Pipeline.stream`)."""
    run = ChainRun(call.chain, runner.events)
    opened, index = await open_hedged(runner, hedging, call, run)
    committed = CommittedStream(runner, opened)
    progress = StreamProgress()
    continuation: Continuation | None = None
    announced = opened.attempt.model  # the model whose text the client is receiving
    try:
        yield StreamStart(announced, index > 0, run.attempts)
        while True:
            try:
                batch: Sequence[StreamEvent] | None = committed.take_head()
                while batch is not None:
                    for event in batch:
                        for forwarded in committed.accept(event):
                            if isinstance(forwarded, TextDelta | ToolUseEvent):
                                if committed.attempt.model != announced:
                                    # Another model's first new text: announced only now, so
                                    # a continuation that diverged is never named.
                                    announced = committed.attempt.model
                                    yield StreamStart(announced, True, run.attempts)
                                if isinstance(forwarded, TextDelta):
                                    progress.parts.append(forwarded.text)
                                else:
                                    progress.tool_calls += 1
                            yield forwarded
                    following = await committed.next_event()
                    batch = None if following is None else (following,)
                stop = committed.finish()
            except (StreamInterruptedError, Diverged) as error:
                if continuation is None:
                    if isinstance(error, Diverged) or not Continuation.applies(
                        runner, committed, progress
                    ):
                        raise
                    continuation = Continuation(runner, call, run, progress, committed, error)
                committed = await continuation.next_stream(committed, error)
                continue
            if continuation is not None:
                continuation.succeeded(committed)
            yield stop
            return
    finally:
        await committed.close()
