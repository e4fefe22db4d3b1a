"""Guardrails over HTTP: a stop is a graceful 200, tool turns are stored, flags apply live."""

from __future__ import annotations

from pathlib import Path

from tests.server import isolated_settings, running_app

KB = str(Path(__file__).parent / "data" / "kb")


def test_hard_limit_in_soft_mode_is_a_graceful_200(tmp_path: Path) -> None:
    settings = isolated_settings(
        tmp_path,
        kb_dir=KB,
        enable_guardrails=True,
        guardrail_mode="soft",
        guardrail_hard_limit=7,
        guardrail_soft_limit=4,
    )
    with running_app(settings) as server, server.client() as client:
        response = client.post(
            "/api/chat", json={"mensagem": "SIM_TOOLS:consultar_kb*30", "conversationId": "g-1"}
        )
        assert response.status_code == 200
        body = response.json()
        assert body["guardrail"] == {
            "mode": "soft",
            "toolCalls": 7,
            "warning": True,
            "stopped": True,
            "reason": "hard_limit",
        }
        assert len(body["toolsUsed"]) == 7
        assert all(call["name"] == "consultar_kb" and call["ok"] for call in body["toolsUsed"])
        assert body["response"]

        # The tool turns are in the stored history, in order, ending with the answer.
        messages = client.get("/api/conversations/g-1").json()["messages"]
        assert messages[0]["role"] == "user" and messages[-1]["role"] == "assistant"
        blocks = [block for m in messages for block in m["blocks"]]
        uses = [b for b in blocks if b["type"] == "toolUse"]
        results = [b for b in blocks if b["type"] == "toolResult"]
        # Two turns of 5 requested calls: 7 ran, the last 3 got a "not run" error result.
        assert len(uses) == len(results) == 10
        assert [r["isError"] for r in results] == [False] * 7 + [True] * 3
        metrics = client.get("/metrics").text
        assert 'guardrails_triggered_total{reason="hard_limit"} 1.0' in metrics
        assert 'guardrails_triggered_total{reason="soft_limit"} 1.0' in metrics


def test_repetition_in_full_mode_and_off_by_default(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, kb_dir=KB, enable_guardrails=True, guardrail_mode="full")
    with running_app(settings) as server, server.client() as client:
        stopped = client.post("/api/chat", json={"mensagem": "SIM_REPEAT:calcular*5"}).json()
        assert stopped["guardrail"]["stopped"] is True
        assert stopped["guardrail"]["reason"] == "repetition"
        assert len(stopped["toolsUsed"]) == 3

    with running_app(isolated_settings(tmp_path, kb_dir=KB)) as server, server.client() as client:
        free = client.post("/api/chat", json={"mensagem": "SIM_REPEAT:calcular*5"}).json()
        assert "guardrail" not in free
        assert len(free["toolsUsed"]) == 5


def test_dry_run_reports_without_changing_the_run(tmp_path: Path) -> None:
    settings = isolated_settings(
        tmp_path, kb_dir=KB, enable_guardrails=True, guardrail_mode="dry-run"
    )
    with running_app(settings) as server, server.client() as client:
        body = client.post("/api/chat", json={"mensagem": "SIM_REPEAT:calcular*5"}).json()
        assert len(body["toolsUsed"]) == 5
        assert body["guardrail"]["stopped"] is False
        assert body["guardrail"]["reason"] == "repetition"
