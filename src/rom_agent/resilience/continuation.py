"""Mid-stream continuation: finishing an answer whose stream was cut after text reached the client.

Two strategies, chosen per model (never both for one attempt):

* **Prefix-verified restart** (any model): the original request is sent again and its answer is
  buffered until it has re-produced everything the client already holds. `PrefixVerifier`
  compares as the text arrives and forwards only what comes after; an answer that diverges —
  other text, a tool call, or an end before the prefix is complete — is not used at all.
* **Prefill continuation** (only models declared able to continue an assistant message): the
  partial answer is sent as a trailing assistant message and what comes back is forwarded.
  Anthropic rejects a prefill ending in whitespace, so trailing whitespace is not sent;
  `PrefillJoiner` drops from the reply the whitespace the client already has.

Which models may be sent a prefill is configuration (`PREFILL_MODELS`, patterns over
`provider/model`): many OpenAI-compatible servers accept a trailing assistant message without
error and start a *new* answer, which would corrupt the output silently, so the default names
only Anthropic models on Bedrock (`anthropic.claude-…` and the cross-region `us.anthropic.…`
inference profiles).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from rom_agent.domain.errors import ProviderError
from rom_agent.domain.events import StreamContinued
from rom_agent.domain.messages import (
    Message,
    ModelRef,
    StopEvent,
    StreamEvent,
    TextDelta,
    ToolUseEvent,
)
from rom_agent.logs import get_logger
from rom_agent.resilience.attempts import Attempt, AttemptRunner, RetryRefused
from rom_agent.resilience.breaker_states import BreakerOpen
from rom_agent.resilience.calls import ModelCall
from rom_agent.resilience.errors import DeadlineExceededError, StreamInterruptedError
from rom_agent.resilience.fallback import ChainRun
from rom_agent.resilience.stream import CUT, STALL, CommittedStream, OpenedStream, open_stream

log = get_logger(__name__)

RESTART = "restart"
PREFILL = "prefill"


class Diverged(Exception):
    """The restarted answer is not the one the client holds a prefix of."""


def prefill_capable(model: ModelRef, patterns: Sequence[str]) -> bool:
    """Whether `model` is declared able to continue an assistant message (`PREFILL_MODELS`)."""
    qualified = model.qualified
    return any(fnmatch.fnmatchcase(qualified, pattern) for pattern in patterns)


def strategy_for(model: ModelRef, patterns: Sequence[str]) -> str:
    return PREFILL if prefill_capable(model, patterns) else RESTART


class PrefixVerifier:
    """Checks a restarted answer against the text already sent, as it arrives.

    `feed(text)` returns the part of `text` the client has not received yet (empty while the
    prefix is still being re-produced) or raises `Diverged` at the first differing character.
    Holding only an offset, it costs one slice comparison per delta, no buffering.
    """

    __slots__ = ("_matched", "_sent")

    def __init__(self, sent: str) -> None:
        self._sent = sent
        self._matched = 0

    @property
    def verified(self) -> bool:
        """The whole sent prefix has been re-produced."""
        return self._matched >= len(self._sent)

    def feed(self, text: str) -> str:
        if self.verified:
            return text
        need = len(self._sent) - self._matched
        head = text[:need]
        if self._sent[self._matched : self._matched + len(head)] != head:
            raise Diverged
        self._matched += len(head)
        return text[need:]

    def end(self) -> None:
        """The restarted answer ended: it must have re-produced the whole prefix."""
        if not self.verified:
            raise Diverged


class PrefillJoiner:
    """Joins a prefill continuation to the text already sent.

    The prefill is sent without its trailing whitespace (`prefill_text`); a model continuing it
    usually starts by re-supplying that whitespace, which the client already has. Only leading
    whitespace matching the withheld tail is dropped, nothing else.
    """

    __slots__ = ("_pending",)
    verified = True  # nothing to verify: the model was given the text it continues

    def __init__(self, sent: str) -> None:
        self._pending = sent[len(sent.rstrip()) :]

    def feed(self, text: str) -> str:
        pending = self._pending
        if not pending:
            return text
        common = 0
        limit = min(len(pending), len(text))
        while common < limit and pending[common] == text[common]:
            common += 1
        if common < len(text) or common == len(pending):
            self._pending = ""  # the reply moved past the withheld whitespace
        else:
            self._pending = pending[common:]
        return text[common:]


def prefill_text(sent: str) -> str:
    return sent.rstrip()


def with_prefill(messages: Sequence[Message], sent: str) -> tuple[Message, ...]:
    """The request's messages with the partial answer appended as the assistant's turn."""
    return (*messages, Message.text("assistant", prefill_text(sent)))


@dataclass(slots=True)
class StreamProgress:
    """What a committed stream has delivered to the client so far."""

    parts: list[str] = field(default_factory=list)  # text deltas forwarded, in order
    tool_calls: int = 0  # tool calls forwarded: such a stream is not continued

    @property
    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    def continuable(self) -> bool:
        # A forwarded tool call cannot be verified against a restart (ids differ per call) nor
        # sent as a prefill; and with no text at all nothing needs continuing.
        return self.tool_calls == 0 and bool(self.text.strip())


# --------------------------------------------------------------------------- runtime


class ContinuedStream(CommittedStream):
    """A continuation attempt after its first content event: forwards only new text."""

    __slots__ = ("_filter", "forwarded", "strategy")

    def __init__(
        self, runner: AttemptRunner, opened: OpenedStream, strategy: str, sent: str
    ) -> None:
        super().__init__(runner, opened)
        self.strategy = strategy
        self._filter: PrefixVerifier | PrefillJoiner = (
            PrefixVerifier(sent) if strategy == RESTART else PrefillJoiner(sent)
        )
        self.forwarded = 0  # characters of new text forwarded

    def accept(self, event: StreamEvent) -> tuple[StreamEvent, ...]:
        if isinstance(event, TextDelta):
            text = self._filter.feed(event.text)  # raises Diverged
            if not text:
                return ()
            self.forwarded += len(text)
            return (event,) if text is event.text else (TextDelta(text),)
        if isinstance(event, StopEvent | ToolUseEvent) and not self._filter.verified:
            raise Diverged  # ended, or turned to a tool call, before re-producing the text
        return super().accept(event)


class Continuation:
    """The continuation of one cut stream: which model next, with which strategy, within the
    retry budget, the breakers, the deadline and at most max(1, MAX_RETRIES) attempts."""

    def __init__(
        self,
        runner: AttemptRunner,
        call: ModelCall,
        run: ChainRun,
        progress: StreamProgress,
        broken: CommittedStream,
        error: StreamInterruptedError,
    ) -> None:
        self._runner = runner
        self._call = call
        self._run = run
        self._progress = progress
        self._error = error  # what the client gets if the answer cannot be finished
        self._origin = broken.attempt.model
        self._index = list(call.chain).index(broken.attempt.model)
        self._attempts = 0
        self._chars_at_break = len(progress.text)
        self._outcomes: list[str] = []

    @staticmethod
    def applies(runner: AttemptRunner, broken: CommittedStream, progress: StreamProgress) -> bool:
        """A break a model can repair: a cut, a stall, a malformed event or a missing end —
        not a refusal (content filter), not the deadline — of a text answer."""
        return (
            runner.flags.current.enable_stream_continuation
            and broken.broke in (CUT, STALL)
            and progress.continuable()
        )

    async def next_stream(
        self, broken: CommittedStream, why: StreamInterruptedError | Diverged
    ) -> ContinuedStream:
        """Close `broken` and open the next continuation; raise the original error when no
        model can continue."""
        if isinstance(broken, ContinuedStream):
            outcome = "diverged" if isinstance(why, Diverged) else "failed"
            broken.release(outcome)  # a divergence is no failure of the model
            self._emit(broken.attempt.model, broken.strategy, outcome)
            # A continuation that moved the answer on gets another go on the same model.
            if outcome == "diverged" or broken.forwarded == 0:
                self._index += 1
        await broken.close()
        runner, call = self._runner, self._call
        chain = call.chain
        settings = runner.flags.current
        while self._index < len(chain) and self._attempts < max(1, settings.max_retries):
            if runner.clock.now() >= call.deadline:
                break
            model = chain[self._index]
            strategy = strategy_for(model, settings.prefill_models)
            sent = self._progress.text
            attempt_call = call
            if strategy == PREFILL:
                attempt_call = dataclasses.replace(call, messages=with_prefill(call.messages, sent))

            async def body(attempt: Attempt, strategy: str = strategy) -> OpenedStream:
                self._attempts += 1
                self._emit(attempt.model, strategy, "started")
                return await open_stream(runner, attempt)

            try:
                opened = await runner.single(attempt_call, self._run, model, body)
            except (BreakerOpen, RetryRefused):
                self._index += 1
                continue
            except ProviderError:
                self._emit(model, strategy, "failed")
                self._index += 1
                continue
            except DeadlineExceededError:
                self._emit(model, strategy, "failed")
                break
            return ContinuedStream(runner, opened, strategy, sent)
        self._log("failed", None)
        raise self._error

    def succeeded(self, finished: CommittedStream) -> None:
        """The answer was finished by `finished` (a continuation)."""
        if isinstance(finished, ContinuedStream):
            self._emit(finished.attempt.model, finished.strategy, "succeeded")
        self._log("succeeded", finished)

    def _emit(self, model: ModelRef, strategy: str, outcome: str) -> None:
        self._outcomes.append(f"{model.id}:{strategy}:{outcome}")
        self._runner.events.emit(StreamContinued, model.id, strategy, outcome)

    def _log(self, outcome: str, finished: CommittedStream | None) -> None:
        log.info(
            "stream continuation",
            outcome=outcome,
            cut_model=self._origin.qualified,
            cut_code=self._error.code,
            chars_before_cut=self._chars_at_break,
            finished_by=finished.attempt.model.qualified if finished is not None else None,
            attempts=self._outcomes,
        )
