"""The tool registry, safe execution, and the built-ins: KB search, date/time, arithmetic."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from rom_agent.agent.kb import KnowledgeBase, fts_query
from rom_agent.agent.tools import (
    ToolError,
    ToolRegistry,
    calculate,
    default_registry,
)
from rom_agent.domain.messages import (
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
)

KB_DATA = Path(__file__).parent / "data" / "kb"
FIXED_NOW = datetime(2025, 1, 15, 15, 30, tzinfo=UTC)  # a Wednesday


@pytest.fixture
def kb_copy(tmp_path: Path) -> Path:
    target = tmp_path / "kb"
    shutil.copytree(KB_DATA, target)
    return target


def call(name: str, **args: Any) -> ToolUseBlock:
    return ToolUseBlock(f"id-{name}", name, args)


def payload(result: ToolResultBlock) -> Any:
    assert not result.is_error, result.content
    return json.loads(result.content)


# --------------------------------------------------------------------------- registry


async def echo(args: dict[str, Any]) -> str:
    return f"eco: {args['texto']}"


ECHO_SCHEMA = {
    "type": "object",
    "properties": {"texto": {"type": "string"}},
    "required": ["texto"],
}


async def test_register_in_one_call_and_run() -> None:
    registry = ToolRegistry()
    registry.register("eco", "Repete o texto.", ECHO_SCHEMA, echo, timeout_s=1)

    result = await registry.run(call("eco", texto="olá"))

    assert registry.specs() == (ToolSpec("eco", "Repete o texto.", ECHO_SCHEMA),)
    assert "eco" in registry
    assert result == ToolResultBlock("id-eco", "eco: olá")


async def test_decorator_form_and_sync_handlers() -> None:
    registry = ToolRegistry()

    @registry.tool(input_schema={"type": "object", "properties": {"a": {"type": "integer"}}})
    def dobro(args: dict[str, Any]) -> dict[str, int]:
        """Dobra um número."""
        return {"resultado": 2 * args["a"]}

    result = await registry.run(call("dobro", a=21))

    assert registry.get("dobro") is not None
    assert registry.specs()[0].description == "Dobra um número."
    assert payload(result) == {"resultado": 42}


def test_registration_is_validated() -> None:
    registry = ToolRegistry()
    registry.register("eco", "x", ECHO_SCHEMA, echo)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("eco", "x", ECHO_SCHEMA, echo)
    with pytest.raises(ValueError, match="invalid tool name"):
        registry.register("com espaço", "x", ECHO_SCHEMA, echo)
    with pytest.raises(ValueError, match="positive"):
        registry.register("outra", "x", ECHO_SCHEMA, echo, timeout_s=0)


async def test_bad_input_and_unknown_tool_are_error_results() -> None:
    registry = ToolRegistry()
    registry.register("eco", "x", ECHO_SCHEMA, echo)

    missing = await registry.run(call("eco"))
    wrong_type = await registry.run(call("eco", texto=True))
    unknown = await registry.run(call("nao_existe"))

    assert missing.is_error and "obrigatório ausente: texto" in missing.content
    assert wrong_type.is_error and "deve ser do tipo string" in wrong_type.content
    assert unknown.is_error and "ferramenta desconhecida" in unknown.content


async def test_failures_become_short_error_results() -> None:
    registry = ToolRegistry()
    never = asyncio.Event()

    async def hangs(args: dict[str, Any]) -> str:
        await never.wait()
        return "unreachable"

    async def breaks(args: dict[str, Any]) -> str:
        raise RuntimeError("segredo interno: senha=123")

    async def refuses(args: dict[str, Any]) -> str:
        raise ToolError("processo não encontrado")

    schema: dict[str, Any] = {"type": "object", "properties": {}}
    registry.register("lenta", "x", schema, hangs, timeout_s=0.01)
    registry.register("quebrada", "x", schema, breaks)
    registry.register("recusa", "x", schema, refuses)

    timed_out = await registry.run(call("lenta"))
    crashed = await registry.run(call("quebrada"))
    refused = await registry.run(call("recusa"))

    assert timed_out.is_error and "tempo limite de 0.01 s" in timed_out.content
    assert crashed.is_error and "erro interno" in crashed.content
    assert "senha" not in crashed.content  # internals stay in the logs
    assert refused.is_error and refused.content.endswith("processo não encontrado")


async def test_long_output_is_truncated() -> None:
    registry = ToolRegistry()

    async def verbose(args: dict[str, Any]) -> str:
        return "x" * 50_000

    registry.register("verbosa", "x", {"type": "object"}, verbose)
    result = await registry.run(call("verbosa"))

    assert len(result.content) < 13_000
    assert result.content.endswith("[resultado truncado]")


def test_default_registry_has_the_built_ins(kb_copy: Path) -> None:
    names = [spec.name for spec in default_registry(kb_copy).specs()]
    assert names == ["consultar_kb", "data_hora_atual", "calcular"]


# --------------------------------------------------------------------------- calcular


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 1", 2),
        ("(1200 * 3) / 7", 514.285714286),
        ("0.1 + 0.2", 0.3),
        ("-2 ** 2", -4),
        ("17 // 5 + 17 % 5", 5),
        ("2 ** -1", 0.5),
        ("+(3)", 3),
        ("1500.50 * 0.1", 150.05),
        # The length cap also bounds nesting to what the parser and evaluator handle.
        ("(" * 149 + "1" + ")" * 149, 1),
        ("-" * 298 + "1", 1),
    ],
)
def test_calculate(expression: str, expected: float) -> None:
    assert calculate(expression) == expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os')", "não permitida"),
        ("__import__('os').system('true')", "não permitida"),
        ("x + 1", "nome não permitido: 'x'"),
        ("abs(-1)", "não permitida"),
        ("'a' * 3", "não permitida"),
        ("True + 1", "não permitida"),
        ("1j * 2", "não permitida"),
        ("[1, 2]", "não permitida"),
        ("(lambda: 1)()", "não permitida"),
        ("1 if 1 else 2", "não permitida"),
        ("2 ^ 3", r"use \*\*"),
        ("9 ** 9 ** 9", "expoente grande demais"),
        ("2 ** 100000", "expoente grande demais"),
        ("10 ** 400", "grande demais"),
        ("(10 ** 300) * (10 ** 300)", "grande demais"),
        ("1e308 * 10", "grande demais"),
        ("(-8) ** (1 / 3)", "não é um número real"),
        ("1 / 0", "divisão por zero"),
        ("1 +", "inválida"),
        ("1" + "+1" * 200, "longa demais"),
    ],
)
def test_calculate_rejects(expression: str, message: str) -> None:
    with pytest.raises(ToolError, match=message):
        calculate(expression)


async def test_calcular_tool(kb_copy: Path) -> None:
    registry = default_registry(kb_copy)

    ok = await registry.run(call("calcular", expressao="2 ** 10"))
    bad = await registry.run(call("calcular", expressao="__import__('os')"))

    assert payload(ok) == {"expressao": "2 ** 10", "resultado": 1024}
    assert bad.is_error


# --------------------------------------------------------------------------- data_hora_atual


async def test_data_hora_atual_uses_the_injected_clock(kb_copy: Path) -> None:
    registry = default_registry(kb_copy, now=lambda: FIXED_NOW)

    default = payload(await registry.run(call("data_hora_atual")))
    manaus = payload(await registry.run(call("data_hora_atual", fuso_horario="America/Manaus")))
    unknown = await registry.run(call("data_hora_atual", fuso_horario="Marte/Olympus"))

    assert default == {
        "iso": "2025-01-15T12:30:00-03:00",
        "texto": "quarta-feira, 15 de janeiro de 2025, 12:30",
        "fuso": "America/Sao_Paulo",
    }
    assert manaus["iso"] == "2025-01-15T11:30:00-04:00"
    assert unknown.is_error and "fuso horário desconhecido" in unknown.content


# --------------------------------------------------------------------------- consultar_kb


async def test_kb_search_hit_has_snippet_and_source(kb_copy: Path) -> None:
    registry = default_registry(kb_copy)

    found = payload(await registry.run(call("consultar_kb", query="prazo de apelação")))

    best = found["resultados"][0]
    assert best["fonte"] == "prazos-processuais.md"
    assert best["titulo"] == "Prazos processuais no CPC"
    assert "apelação é de 15 dias úteis" in best["trecho"]


async def test_kb_search_ignores_accents_and_finds_plain_text_files(kb_copy: Path) -> None:
    kb = KnowledgeBase(kb_copy)

    hits = await kb.asearch("usucapiao extrajudicial")

    assert hits[0].source == "usucapiao.txt"
    assert hits[0].title == "Usucapião de imóveis urbanos e rurais"


async def test_kb_search_miss(kb_copy: Path) -> None:
    registry = default_registry(kb_copy)

    missed = payload(await registry.run(call("consultar_kb", query="xilofone quântico")))

    assert missed["resultados"] == []
    assert "Nenhum trecho" in missed["mensagem"]


def test_fts_operators_in_queries_are_inert(kb_copy: Path) -> None:
    kb = KnowledgeBase(kb_copy)

    assert kb.search('prazo" OR NOT (dados* NEAR:') != []
    assert kb.search("de a o") == []  # stopwords only: nothing to look for
    assert fts_query("Prazos de recurso") == '"praz"* OR "recur"*'


def test_kb_reindexes_when_files_change(kb_copy: Path) -> None:
    clock = [0.0]
    kb = KnowledgeBase(kb_copy, recheck_s=5.0, monotonic=lambda: clock[0])
    assert kb.search("mandado de segurança") == []

    (kb_copy / "mandado.md").write_text("# Mandado de segurança\n\nPrazo decadencial de 120 dias.")
    # Within the re-check interval the folder is not looked at again.
    clock[0] = 1.0
    assert kb.search("mandado de segurança") == []
    clock[0] = 6.0
    assert [h.source for h in kb.search("mandado de segurança")] == ["mandado.md"]

    # An edited file is picked up too (size and mtime both change).
    edited = kb_copy / "prazos-processuais.md"
    edited.write_text("# Prazos\n\nTexto novo sobre o agravo de instrumento.", encoding="utf-8")
    os.utime(edited, ns=(1, 1))
    clock[0] = 12.0
    assert [h.source for h in kb.search("agravo")] == ["prazos-processuais.md"]
    assert kb.search("apelação") == []

    (kb_copy / "mandado.md").unlink()
    clock[0] = 18.0
    assert kb.search("mandado de segurança") == []
    assert kb.document_count == 4


def test_kb_missing_folder_is_empty_until_created(tmp_path: Path) -> None:
    kb = KnowledgeBase(tmp_path / "ainda-nao-existe", recheck_s=0)
    assert kb.search("prazo") == []

    shutil.copytree(KB_DATA, tmp_path / "ainda-nao-existe")

    assert kb.search("prazo") != []
