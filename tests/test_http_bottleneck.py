"""Admission control over HTTP: the guide's burst, queue timeout, disconnects, runtime limits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from rom_agent.app import create_services
from tests.gates import GatedSimulator, until, wait_until
from tests.server import isolated_settings, running_app


def test_the_guides_burst_30_requests_25_answered_5_rejected(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, enable_bottleneck=True, max_concurrent=5, max_queue=20)
    gate = GatedSimulator()
    services = create_services(settings, providers={"simulator": gate})
    with running_app(settings, services) as server:

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=40)
            async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
                tasks = [
                    asyncio.create_task(
                        client.post(
                            "/api/chat",
                            json={
                                "mensagem": f"Teste concorrência {i}",
                                "conversationId": f"bn-test-{i}",
                            },
                        )
                    )
                    for i in range(30)
                ]
                bottleneck = services.bottleneck
                await until(
                    lambda: (
                        bottleneck.running == 5
                        and bottleneck.queued == 20
                        and sum(t.done() for t in tasks) == 5
                    )
                )
                gate.open()
                return await asyncio.gather(*tasks)

        responses = asyncio.run(burst())
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) == 25
        assert statuses.count(503) == 5
        for response in responses:
            if response.status_code == 503:
                body = response.json()
                assert body == {
                    "error": "Service temporarily unavailable: queue full (20/20)",
                    "status": 503,
                    "code": "QUEUE_FULL",
                }
                assert int(response.headers["retry-after"]) >= 1
        registry = services.metrics.registry
        assert (
            registry.get_sample_value(
                "bottleneck_rejected_total", {"operation": "converse", "reason": "queue_full"}
            )
            == 5
        )
        assert (
            registry.get_sample_value("bottleneck_running_total", {"operation": "converse"}) == 25
        )
        assert registry.get_sample_value("bottleneck_queued_total", {"operation": "converse"}) == 20
        assert services.bottleneck.running == 0 and services.bottleneck.queued == 0
        text = httpx.get(server.url + "/metrics").text
        assert "bottleneck_running 0.0" in text and "bottleneck_queued 0.0" in text


def test_health_metrics_and_admin_never_queue(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, enable_bottleneck=True, max_concurrent=1, max_queue=0)
    gate = GatedSimulator()
    services = create_services(settings, providers={"simulator": gate})
    with running_app(settings, services) as server, server.client() as client:
        import threading

        held = threading.Thread(target=lambda: client.post("/api/chat", json={"message": "hold"}))
        held.start()
        wait_until(lambda: services.bottleneck.running == 1)
        rejected = client.post("/api/chat", json={"message": "no room"})
        assert rejected.status_code == 503 and rejected.json()["code"] == "QUEUE_FULL"
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        assert client.get("/metrics").status_code == 200
        gate.open()
        held.join()


def test_a_client_that_disconnects_while_queued_leaves_the_queue(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, enable_bottleneck=True, max_concurrent=1, max_queue=5)
    gate = GatedSimulator()
    services = create_services(settings, providers={"simulator": gate})
    with running_app(settings, services) as server:

        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                running = asyncio.create_task(client.post("/api/chat", json={"message": "a"}))
                await until(lambda: services.bottleneck.running == 1)
                queued = asyncio.create_task(client.post("/api/chat", json={"message": "b"}))
                await until(lambda: services.bottleneck.queued == 1)
                queued.cancel()  # closes that connection
                await until(lambda: services.bottleneck.queued == 0)
                gate.open()
                assert (await running).status_code == 200

        asyncio.run(scenario())
        assert services.bottleneck.running == 0
        assert services.bottleneck.queued == 0
