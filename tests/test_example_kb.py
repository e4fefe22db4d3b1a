"""The knowledge base shipped in kb/ answers `consultar_kb` on the default configuration."""

from __future__ import annotations

import json
from pathlib import Path

from tests.server import isolated_settings, running_app

REPO_KB = Path(__file__).resolve().parent.parent / "kb"


def test_the_default_kb_answers_consultar_kb_over_http(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, kb_dir=str(REPO_KB))
    with running_app(settings) as running, running.client() as client:
        turn = client.post("/api/chat", json={"mensagem": "SIM_TOOLS:consultar_kb*1"})
        assert turn.status_code == 200, turn.text
        assert [t["name"] for t in turn.json()["toolsUsed"]] == ["consultar_kb"]
        stored = client.get(f"/api/conversations/{turn.json()['conversationId']}").json()
    results = [
        json.loads(block["content"])
        for message in stored["messages"]
        for block in message["blocks"]
        if block["type"] == "toolResult"
    ]
    assert len(results) == 1
    sources = {hit["fonte"] for hit in results[0]["resultados"]}
    assert "prazos-processuais.md" in sources
