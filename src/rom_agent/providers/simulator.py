"""The embedded default provider: no network, deterministic, honest about tokens.

It answers in the user's language (Portuguese, Spanish or English), acknowledges the message
and names its model, so a new user can chat at once. Tests and benchmarks script it with
`SimBehaviour`s: latency, a slow first token, errors of each class, stream cuts and stalls.

It also obeys two drill directives in the user message (SPEC §7), whatever
ENABLE_FAULT_INJECTION says, so guardrails can be exercised end to end:

* `SIM_TOOLS:<tool>*<n>` — request `<n>` calls of `<tool>` over the next turns, up to 5 per
  turn, each with a different input; then answer with a summary of the results received.
* `SIM_REPEAT:<tool>*<n>` — request `<tool>` with the same input, one call per turn, `<n>`
  times; then answer likewise.

Progress is read from the messages of the request (tool requests made since the user message
that started the run), so the simulator stays stateless and concurrent runs never interfere.
A request that offers no tools, or not that tool, gets the summary at once.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rom_agent.domain.errors import (
    ErrorKind,
    ProviderError,
)
from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    ContentBlock,
    Message,
    StopEvent,
    StreamEvent,
    TextBlock,
    TextDelta,
    ToolResultBlock,
    ToolUseBlock,
    ToolUseEvent,
    Usage,
    UsageEvent,
)

# A token is a word or a single punctuation mark: close to what BPE tokenizers report for
# plain prose, and — what matters — the same count every time for the same text.
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_WORD = re.compile(r"[a-zà-ÿ]+")
_CHUNK = re.compile(r"\S+\s*")
_DIRECTIVE = re.compile(r"\bSIM_(TOOLS|REPEAT):([A-Za-z0-9_-]{1,64})\*(\d{1,4})\b")
_MAX_TOOL_USES_PER_TURN = 5

_LANGUAGE_MARKERS: dict[str, frozenset[str]] = {
    "pt": frozenset(
        "olá ola você voce não nao obrigado obrigada está esta como qual quais para uma com "
        "que são sao meu minha teste recuperação concorrência processo tribunal sobre".split()
    ),
    "es": frozenset(
        "hola usted gracias está cómo como cuál para una con qué son mi prueba por favor "
        "el los las del".split()
    ),
    "en": frozenset(
        "hello hi the you what how is are please thanks thank my with for about test".split()
    ),
}

_REPLIES = {
    "pt": (
        "Olá! Aqui é o {model}, o modelo simulado do ROM Agent. Recebi a sua mensagem "
        "({words} palavras): “{quote}”. Esta é uma resposta de demonstração; configure "
        "MODEL_CHAIN com um provedor real (Bedrock ou compatível com OpenAI) para respostas "
        "de verdade."
    ),
    "es": (
        "¡Hola! Soy {model}, el modelo simulado de ROM Agent. Recibí tu mensaje "
        "({words} palabras): “{quote}”. Esta es una respuesta de demostración; configura "
        "MODEL_CHAIN con un proveedor real (Bedrock o compatible con OpenAI) para respuestas "
        "reales."
    ),
    "en": (
        "Hello! This is {model}, ROM Agent's simulated model. I received your message "
        "({words} words): “{quote}”. This is a demo answer; set MODEL_CHAIN to a real "
        "provider (Bedrock or OpenAI-compatible) for real answers."
    ),
}

_QUOTE_CHARS = 80


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def detect_language(text: str) -> str:
    words = _WORD.findall(text.lower())
    scores = {
        lang: sum(word in markers for word in words) for lang, markers in _LANGUAGE_MARKERS.items()
    }
    best = max(scores, key=lambda lang: scores[lang])
    return best if scores[best] > 0 else "en"


def demo_reply(model: str, user_text: str) -> str:
    text = " ".join(user_text.split())
    quote = text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 1] + "…"
    template = _REPLIES[detect_language(text)]
    return template.format(model=model, words=len(text.split()), quote=quote)


@dataclass(frozen=True, slots=True)
class SimBehaviour:
    """What one simulated call does. Defaults: answer at once with the demo reply."""

    latency_s: float = 0.0  # before the response (complete) or the first chunk (stream)
    chunk_delay_s: float = 0.0  # between stream chunks
    error: ErrorKind | None = None
    error_status: int | None = None
    error_type: str | None = None
    retry_after_s: float | None = None
    text: str | None = None  # fixed answer instead of the demo reply
    tool_uses: tuple[ToolUseBlock, ...] = ()
    cut_after_chunks: int | None = None  # stream: fail (transient) after N chunks
    stall_after_chunks: int | None = None  # stream: go silent after N chunks
    stall_s: float = 3600.0


def _error(behaviour: SimBehaviour, model: str) -> ProviderError:
    kind = behaviour.error or ErrorKind.TRANSIENT
    status = behaviour.error_status or {"transient": 503, "model": 400, "request": 400}[kind]
    return ProviderError(
        kind,
        f"simulated {kind.value} error from {model}",
        status=status,
        error_type=behaviour.error_type or "SimulatedError",
        retry_after_s=behaviour.retry_after_s,
    )


def _is_user_turn(message: Message) -> bool:
    """A message the user wrote, as opposed to tool results (with or without a loop note)."""
    return (
        message.role == "user"
        and bool(message.plain_text)
        and not any(isinstance(block, ToolResultBlock) for block in message.content)
    )


def _run_start(messages: Sequence[Message]) -> int | None:
    """Index of the user message that started the current agent run."""
    for index in range(len(messages) - 1, -1, -1):
        if _is_user_turn(messages[index]):
            return index
    return None


def _last_user_text(messages: Sequence[Message]) -> str:
    start = _run_start(messages)
    return "" if start is None else messages[start].plain_text


# --------------------------------------------------------------------------- drill directives


@dataclass(frozen=True, slots=True)
class ToolDirective:
    tool: str
    total: int
    repeat: bool  # SIM_REPEAT: same input, one call per turn

    @property
    def label(self) -> str:
        return f"SIM_{'REPEAT' if self.repeat else 'TOOLS'}:{self.tool}*{self.total}"


def parse_directive(text: str) -> ToolDirective | None:
    match = _DIRECTIVE.search(text)
    if match is None:
        return None
    kind, tool, total = match.groups()
    return ToolDirective(tool, int(total), repeat=kind == "REPEAT")


def _directive_input(tool: str, index: int) -> dict[str, Any]:
    """Plausible input for the built-in tools, distinct per index; generic otherwise."""
    if tool == "consultar_kb":
        return {"query": f"prazo processual {index}"}
    if tool == "calcular":
        return {"expressao": f"{index} + {index}"}
    return {"n": index}


def _directed_answer(request: ChatRequest) -> tuple[ContentBlock, ...] | None:
    """The next step of a drill directive, or None when the run carries none."""
    start = _run_start(request.messages)
    if start is None:
        return None
    directive = parse_directive(request.messages[start].plain_text)
    if directive is None:
        return None
    since = request.messages[start + 1 :]
    requested = sum(
        isinstance(block, ToolUseBlock) and block.name == directive.tool
        for message in since
        if message.role == "assistant"
        for block in message.content
    )
    remaining = directive.total - requested
    offered = any(spec.name == directive.tool for spec in request.tools)
    if remaining > 0 and offered:
        batch = 1 if directive.repeat else min(remaining, _MAX_TOOL_USES_PER_TURN)
        return tuple(
            ToolUseBlock(
                id=f"tooluse_sim_{uuid.uuid4().hex[:16]}",
                name=directive.tool,
                input=_directive_input(directive.tool, 1 if directive.repeat else requested + k),
            )
            for k in range(1, batch + 1)
        )
    results = [
        block
        for message in since
        if message.role == "user"
        for block in message.content
        if isinstance(block, ToolResultBlock)
    ]
    errors = sum(result.is_error for result in results)
    summary = (
        f"{directive.label}: pedi {requested} chamada(s) de {directive.tool} e recebi "
        f"{len(results)} resultado(s) de ferramenta, {errors} com erro."
    )
    if remaining > 0:
        summary += " Encerrei antes do previsto porque as ferramentas não foram oferecidas."
    return (TextBlock(summary),)


def _input_tokens(request: ChatRequest) -> int:
    total = count_tokens(request.system) if request.system else 0
    for message in request.messages:
        for block in message.content:
            if isinstance(block, TextBlock):
                total += count_tokens(block.text)
            elif isinstance(block, ToolUseBlock):
                total += count_tokens(block.name) + count_tokens(str(block.input))
            else:
                total += count_tokens(block.content)
    return total


def _stop_reason(content: Sequence[ContentBlock]) -> str:
    return "tool_use" if any(isinstance(b, ToolUseBlock) for b in content) else "end_turn"


class SimulatorProvider:
    """Scripted per model: a default behaviour plus a queue of one-shot behaviours."""

    name = "simulator"

    def __init__(
        self,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        default: SimBehaviour | None = None,
        per_model: Mapping[str, SimBehaviour] | None = None,
    ) -> None:
        # Injected so tests drive latency with a fake clock instead of sleeping.
        self._sleep = sleep
        self._default = default or SimBehaviour()
        self._per_model = dict(per_model or {})
        self._scripts: dict[str, deque[SimBehaviour]] = {}
        # No record of the requests: this object serves production traffic, and a list of
        # them kept every turn's history window alive. Tests that need one use a subclass.

    # ------------------------------------------------------------------ scripting

    def set_behaviour(self, model: str, behaviour: SimBehaviour) -> None:
        self._per_model[model] = behaviour

    def script(self, model: str, behaviours: Iterable[SimBehaviour]) -> None:
        """Queue one-shot behaviours for `model`; each call consumes one, then the default."""
        self._scripts.setdefault(model, deque()).extend(behaviours)

    def _next(self, model: str) -> SimBehaviour:
        queue = self._scripts.get(model)
        if queue:
            return queue.popleft()
        return self._per_model.get(model, self._default)

    # ------------------------------------------------------------------ provider interface

    def _answer(self, request: ChatRequest, behaviour: SimBehaviour) -> tuple[ContentBlock, ...]:
        # Scripted tool uses are the most specific instruction, then a drill directive.
        if behaviour.tool_uses:
            return behaviour.tool_uses
        directed = _directed_answer(request)
        if directed is not None:
            return directed
        text = behaviour.text or demo_reply(request.model, _last_user_text(request.messages))
        return (TextBlock(text),)

    async def complete(self, request: ChatRequest) -> ChatResponse:
        behaviour = self._next(request.model)
        if behaviour.latency_s:
            await self._sleep(behaviour.latency_s)
        if behaviour.error is not None:
            raise _error(behaviour, request.model)
        content = self._answer(request, behaviour)
        output = sum(
            count_tokens(b.text if isinstance(b, TextBlock) else str(b.input))
            for b in content
            if isinstance(b, TextBlock | ToolUseBlock)
        )
        return ChatResponse(
            request.model, content, _stop_reason(content), Usage(_input_tokens(request), output)
        )

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        behaviour = self._next(request.model)
        if behaviour.latency_s:
            await self._sleep(behaviour.latency_s)
        if behaviour.error is not None:
            raise _error(behaviour, request.model)
        content = self._answer(request, behaviour)
        output_tokens = 0
        sent = 0
        for block in content:
            if isinstance(block, ToolUseBlock):
                output_tokens += count_tokens(str(block.input))
                yield ToolUseEvent(block)
                continue
            assert isinstance(block, TextBlock)
            for piece in _CHUNK.findall(block.text):
                if sent and behaviour.chunk_delay_s:
                    await self._sleep(behaviour.chunk_delay_s)
                if behaviour.cut_after_chunks is not None and sent >= behaviour.cut_after_chunks:
                    raise ProviderError(
                        ErrorKind.TRANSIENT,
                        f"simulated stream cut from {request.model}",
                        error_type="StreamCut",
                    )
                if (
                    behaviour.stall_after_chunks is not None
                    and sent >= behaviour.stall_after_chunks
                ):
                    await self._sleep(behaviour.stall_s)
                output_tokens += count_tokens(piece)
                sent += 1
                yield TextDelta(piece)
        yield UsageEvent(Usage(_input_tokens(request), output_tokens))
        yield StopEvent(_stop_reason(content))

    async def aclose(self) -> None:
        return None
