"""Pytest fixtures for the fake upstreams.

Load with `pytest_plugins = ("tests.fakes.fixtures",)` in a test module (importing fixtures by
name trips the linter's redefinition check).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from rom_agent.providers.bedrock import BedrockProvider
from rom_agent.providers.openai import OpenAIProvider
from tests.fakes import DUMMY_API_KEY, TEST_REGION
from tests.fakes.bedrock_server import FakeBedrock
from tests.fakes.openai_server import FakeOpenAI


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Static dummy credentials through the real botocore chain, isolated from the host."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
async def fake_bedrock() -> AsyncIterator[FakeBedrock]:
    async with FakeBedrock() as fake:
        yield fake


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
async def bedrock_provider(
    fake_bedrock: FakeBedrock, aws_env: None
) -> AsyncIterator[BedrockProvider]:
    provider = BedrockProvider(region=TEST_REGION, endpoint_url=fake_bedrock.url)
    yield provider
    await provider.aclose()


@pytest.fixture
async def openai_provider(fake_openai: FakeOpenAI) -> AsyncIterator[OpenAIProvider]:
    provider = OpenAIProvider(f"{fake_openai.url}/v1", DUMMY_API_KEY)
    yield provider
    await provider.aclose()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nobody listens on: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield port
