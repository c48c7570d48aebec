"""Fake model servers for the run tests: real local HTTP servers speaking each vendor's wire
format (tests/fakes/llm_servers.py). One per test module; tests reset their scripts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.llm_servers import FakeAnthropicServer, FakeOpenAIServer


@pytest.fixture(scope="module")
def openai_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture(scope="module")
def anthropic_server() -> Iterator[FakeAnthropicServer]:
    with FakeAnthropicServer() as server:
        yield server
