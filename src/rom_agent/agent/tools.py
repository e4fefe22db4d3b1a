"""The tool registry and the built-in tools.

A tool is a name, a description, a JSON-schema for its input and an async handler. Register one
with a single call::

    registry.register(
        "buscar_cep",
        "Busca o endereço de um CEP brasileiro.",
        {"type": "object", "properties": {"cep": {"type": "string"}}, "required": ["cep"]},
        buscar_cep,  # async def buscar_cep(args: dict) -> str | dict | list
        timeout_s=5,
    )

`ToolRegistry.run` executes one call safely: input checked against the schema's top level,
a per-tool timeout, and every failure turned into an error result for the model — a tool
never fails the request. Raise `ToolError` for failures the model should read verbatim.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import math
import operator
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from rom_agent.agent.kb import KnowledgeBase
from rom_agent.domain.messages import (
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
)
from rom_agent.logs import get_logger

DEFAULT_TOOL_TIMEOUT_S = 10.0
_MAX_RESULT_CHARS = 12_000  # a tool result is context the model pays for on every later turn
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what Bedrock and OpenAI accept as a tool name

ToolOutput = str | Mapping[str, Any] | list[Any]
ToolHandler = Callable[[dict[str, Any]], Awaitable[ToolOutput]]
SyncToolHandler = Callable[[dict[str, Any]], ToolOutput]
H = TypeVar("H", ToolHandler, SyncToolHandler)

_log = get_logger(__name__)


class ToolError(Exception):
    """A failure the model should see as is (bad input, nothing to do). Keep it short."""


@dataclass(frozen=True, slots=True)
class Tool:
    spec: ToolSpec
    handler: ToolHandler
    timeout_s: float


# --------------------------------------------------------------------------- registry


class ToolRegistry:
    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def register(
        self,
        name: str,
        description: str,
        input_schema: Mapping[str, Any],
        handler: ToolHandler | SyncToolHandler,
        *,
        timeout_s: float = DEFAULT_TOOL_TIMEOUT_S,
    ) -> Tool:
        """Add a tool. A sync handler runs in a worker thread (its timeout stops the waiting,
        not the thread), so prefer async handlers for anything that can hang."""
        if not _NAME.match(name):
            raise ValueError(f"invalid tool name {name!r}: use 1-64 of [A-Za-z0-9_-]")
        if name in self._tools:
            raise ValueError(f"tool {name!r} is already registered")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        tool = Tool(ToolSpec(name, description, dict(input_schema)), _as_async(handler), timeout_s)
        self._tools[name] = tool
        return tool

    def tool(
        self,
        name: str | None = None,
        *,
        input_schema: Mapping[str, Any] | None = None,
        description: str | None = None,
        timeout_s: float = DEFAULT_TOOL_TIMEOUT_S,
    ) -> Callable[[H], H]:
        """Decorator form of `register`; name and description default to the function's."""

        def decorate(handler: H) -> H:
            self.register(
                name or handler.__name__,
                description or inspect.getdoc(handler) or "",
                input_schema or {"type": "object", "properties": {}},
                handler,
                timeout_s=timeout_s,
            )
            return handler

        return decorate

    def specs(self) -> tuple[ToolSpec, ...]:
        return tuple(tool.spec for tool in self._tools.values())

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    async def run(self, call: ToolUseBlock) -> ToolResultBlock:
        """Execute one call. Never raises (except cancellation of the whole request)."""
        tool = self._tools.get(call.name)
        if tool is None:
            return _failure(call, f"ferramenta desconhecida: {call.name!r}")
        try:
            _check_input(tool.spec.input_schema, call.input)
            async with asyncio.timeout(tool.timeout_s):
                output = await tool.handler(call.input)
        except ToolError as exc:
            return _failure(call, str(exc))
        except TimeoutError:
            _log.warning("tool_timeout", tool=call.name, timeout_s=tool.timeout_s)
            return _failure(call, f"a ferramenta excedeu o tempo limite de {tool.timeout_s:g} s")
        except Exception:
            # The details stay in our logs; the model (and so the user) gets no internals.
            _log.exception("tool_failed", tool=call.name)
            return _failure(call, "erro interno ao executar a ferramenta")
        return ToolResultBlock(call.id, _render(output))


def _as_async(handler: ToolHandler | SyncToolHandler) -> ToolHandler:
    if inspect.iscoroutinefunction(handler):
        return handler

    async def threaded(args: dict[str, Any]) -> ToolOutput:
        return await asyncio.to_thread(handler, args)  # type: ignore[arg-type]

    return threaded


def _failure(call: ToolUseBlock, message: str) -> ToolResultBlock:
    return ToolResultBlock(call.id, f"Erro na ferramenta {call.name}: {message}", is_error=True)


def _render(output: ToolOutput) -> str:
    if isinstance(output, str):
        text = output
    else:
        text = json.dumps(output, ensure_ascii=False, default=str)
    if len(text) > _MAX_RESULT_CHARS:
        return text[:_MAX_RESULT_CHARS] + " … [resultado truncado]"
    return text


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def _check_input(schema: Mapping[str, Any], args: Mapping[str, Any]) -> None:
    """Required keys and top-level types: the mistakes models actually make, reported clearly.

    Not a full JSON-schema validator; handlers still check what they rely on.
    """
    missing = [key for key in schema.get("required", ()) if key not in args]
    if missing:
        raise ToolError(f"parâmetro obrigatório ausente: {', '.join(missing)}")
    for key, prop in schema.get("properties", {}).items():
        expected = _JSON_TYPES.get(prop.get("type", ""))
        if key not in args or expected is None:
            continue
        value = args[key]
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            raise ToolError(f"parâmetro {key!r} deve ser do tipo {prop['type']}")


# --------------------------------------------------------------------------- consultar_kb


def register_kb_search(registry: ToolRegistry, kb: KnowledgeBase) -> None:
    async def consultar_kb(args: dict[str, Any]) -> dict[str, Any]:
        query = args["query"].strip()
        if not query:
            raise ToolError("a consulta está vazia")
        limit = min(max(int(args.get("max_resultados", 5)), 1), 10)
        hits = await kb.asearch(query, limit)
        found = [{"fonte": h.source, "titulo": h.title, "trecho": h.snippet} for h in hits]
        result: dict[str, Any] = {"query": query, "resultados": found}
        if not found:
            result["mensagem"] = "Nenhum trecho encontrado na base de conhecimento."
        return result

    registry.register(
        "consultar_kb",
        "Pesquisa a base de conhecimento (documentos internos) por palavras-chave e devolve "
        "os trechos mais relevantes com o nome do arquivo de origem.",
        {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "palavras-chave da pesquisa"},
                "max_resultados": {"type": "integer", "minimum": 1, "maximum": 10},
            },
            "required": ["query"],
        },
        consultar_kb,
        timeout_s=10,
    )


# --------------------------------------------------------------------------- data_hora_atual

DEFAULT_TIMEZONE = "America/Sao_Paulo"
# Brazil has had no daylight saving time since 2019: a fixed offset is exact when the
# system has no tz database (slim containers without tzdata).
_SAO_PAULO_FALLBACK = timezone(timedelta(hours=-3), "-03")
_WEEKDAYS = "segunda-feira terça-feira quarta-feira quinta-feira sexta-feira sábado domingo".split()
_MONTHS = (
    "janeiro fevereiro março abril maio junho julho agosto setembro outubro novembro dezembro"
).split()


def _zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        if name == DEFAULT_TIMEZONE:
            return _SAO_PAULO_FALLBACK
        raise ToolError(f"fuso horário desconhecido: {name!r}") from None


def register_clock(registry: ToolRegistry, now: Callable[[], datetime]) -> None:
    async def data_hora_atual(args: dict[str, Any]) -> dict[str, str]:
        zone_name = args.get("fuso_horario") or DEFAULT_TIMEZONE
        local = now().astimezone(_zone(zone_name))
        human = (
            f"{_WEEKDAYS[local.weekday()]}, {local.day} de {_MONTHS[local.month - 1]} "
            f"de {local.year}, {local:%H:%M}"
        )
        return {"iso": local.isoformat(timespec="seconds"), "texto": human, "fuso": zone_name}

    registry.register(
        "data_hora_atual",
        "Informa a data e a hora atuais (por padrão no horário de Brasília).",
        {
            "type": "object",
            "properties": {
                "fuso_horario": {"type": "string", "description": "IANA, ex. America/Manaus"}
            },
        },
        data_hora_atual,
        timeout_s=2,
    )


# --------------------------------------------------------------------------- calcular

_MAX_EXPRESSION_CHARS = 300  # also bounds the nesting depth the evaluator recurses into
_MAX_EXPONENT = 1000
_MAX_INT_BITS = 1024  # about 308 decimal digits, the float range: plenty for arithmetic
_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_ALLOWED = "use apenas números, + - * / // % ** e parênteses"

Number = int | float


def _checked(value: Any) -> Number:
    if isinstance(value, complex):
        raise ToolError("o resultado não é um número real")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("resultado grande demais")
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise ToolError("resultado grande demais")
    return value  # type: ignore[no-any-return]


def _power(base: Number, exponent: Number) -> Number:
    # Refuse before computing: 9**9**9 would otherwise hang the worker for minutes.
    if abs(exponent) > _MAX_EXPONENT:
        raise ToolError(f"expoente grande demais (máximo {_MAX_EXPONENT})")
    if abs(base) > 1 and exponent * math.log2(abs(base)) > _MAX_INT_BITS:
        raise ToolError("resultado grande demais")
    return _checked(base**exponent)


def _evaluate(node: ast.AST) -> Number:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        return _checked(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise ToolError("'^' não é potência: use **")
    if isinstance(node, ast.Name):
        raise ToolError(f"nome não permitido: {node.id!r}; {_ALLOWED}")
    raise ToolError(f"expressão não permitida; {_ALLOWED}")


def calculate(expression: str) -> Number:
    """Evaluate plain arithmetic safely: the AST is walked by hand, nothing is ever `eval`ed."""
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise ToolError(f"expressão longa demais (máximo {_MAX_EXPRESSION_CHARS} caracteres)")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError):  # the last two: absurd nesting
        raise ToolError(f"expressão inválida; {_ALLOWED}") from None
    try:
        result = _evaluate(tree)
    except ZeroDivisionError:
        raise ToolError("divisão por zero") from None
    except OverflowError:
        raise ToolError("resultado grande demais") from None
    # 0.1 + 0.2 reads 0.3 to the model, not 0.30000000000000004.
    return float(f"{result:.12g}") if isinstance(result, float) else result


def register_calculator(registry: ToolRegistry) -> None:
    async def calcular(args: dict[str, Any]) -> dict[str, Any]:
        expression = args["expressao"]
        return {"expressao": expression, "resultado": calculate(expression)}

    registry.register(
        "calcular",
        "Calcula uma expressão aritmética (números, + - * / // % ** e parênteses). "
        "Use ponto como separador decimal, ex. 1500.50 * 0.1.",
        {
            "type": "object",
            "properties": {"expressao": {"type": "string", "description": "ex. (1200 * 3) / 7"}},
            "required": ["expressao"],
        },
        calcular,
        timeout_s=2,
    )


# --------------------------------------------------------------------------- built-ins


def _utc_now() -> datetime:
    return datetime.now(UTC)


def default_registry(
    kb_dir: str | Path,
    *,
    now: Callable[[], datetime] = _utc_now,
    kb: KnowledgeBase | None = None,
) -> ToolRegistry:
    """The built-in tools. Builds the KB index at once (blocking): call it at startup."""
    registry = ToolRegistry()
    register_kb_search(registry, kb or KnowledgeBase(kb_dir))
    register_clock(registry, now)
    register_calculator(registry)
    return registry
