"""Fixtures shared by every test: the real embedding model (loaded once) and the
scripted OpenAI-compatible server on loopback."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# Keep CPU use predictable on small CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.fakes.llm_server import Script, ScriptedLLM, ServerThread


@pytest.fixture(scope="session")
def embedder() -> Any:
    from airoboros.embeddings import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder()


@pytest.fixture
def llm_server() -> Iterator[Callable[..., ServerThread]]:
    """Factory: ``llm_server(latency=0.01, refusal_rate=0.1)`` starts a server."""
    started: list[ServerThread] = []

    def start(**script: Any) -> ServerThread:
        srv = ServerThread(ScriptedLLM(Script(**script)))
        srv.__enter__()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.__exit__(None, None, None)
