"""The keys of ``python -m airoboros.lmoe.api``: one source for the client keys (the
``--api-keys`` flag over AIROBOROS_API_KEYS), and an inference app behind the router that
answers only to a random internal key the router holds.

The apps are the ones ``airoboros.lmoe.api.build`` makes, each under uvicorn on a loopback
port (the router forwards over a real connection), on a tiny random Llama with one expert.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import airoboros.embeddings
from airoboros.lmoe import api
from tests.fakes.asgi_server import AppServer
from tests.fakes.tiny_llama import build_tiny_llama
from tests.unit.test_inference import make_adapter

CHAT = {"model": "code", "messages": [{"role": "user", "content": "Sort a list."}], "max_tokens": 2}


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lmoe-keys")
    base = build_tiny_llama(root / "tiny-llama", initializer_range=0.1)
    pkg = root / "package"
    make_adapter(base, pkg / "adapters" / "code", 1, description="the code expert")
    routing = pkg / "routing_data" / "expert_code.jsonl"
    routing.parent.mkdir(parents=True, exist_ok=True)
    routing.write_text(json.dumps({"instruction": "A chat. Write a python function."}) + "\n")
    return {"base": base, "lmoe": pkg}


@pytest.fixture
def lmoe(package: dict[str, Path], embedder: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``lmoe(*flags)``: the two apps of ``lmoe.api`` serving on loopback (the environment
    as the test set it before the call); returns (router url, inference url, apps)."""
    # The router loads its embedding model after start; give it the session's one.
    monkeypatch.setattr(
        airoboros.embeddings, "SentenceTransformerEmbedder", lambda *a, **k: embedder
    )
    servers: list[AppServer] = []

    def start(*flags: str) -> tuple[str, str, Any, Any]:
        port = api.free_loopback_port()
        args = api.parse_args(
            ["--base-model", str(package["base"]), "--lmoe", str(package["lmoe"]), *flags]
        )
        inference, router = api.build(args, port)
        servers.append(AppServer(inference, port=port).__enter__())
        servers.append(AppServer(router).__enter__())
        router_url, inference_url = servers[-1].url, servers[-2].url
        deadline = time.monotonic() + 60
        while httpx.get(f"{router_url}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the router did not get ready"
            time.sleep(0.1)
        return router_url, inference_url, inference, router

    yield start
    for srv in reversed(servers):
        srv.__exit__(None, None, None)


def chat(url: str, key: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers, timeout=120)


def test_the_flag_wins_over_the_environment(lmoe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIROBOROS_API_KEYS", "env-key")
    router_url, _, _, _ = lmoe("--api-keys", "flag-key")
    ok = chat(router_url, "flag-key")
    assert ok.status_code == 200, ok.text
    assert ok.json()["expert"] == "code"
    assert chat(router_url, "env-key").status_code == 401
    assert chat(router_url, None).status_code == 401


def test_the_environment_keys_without_the_flag(lmoe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIROBOROS_API_KEYS", "env-key,other-key")
    router_url, _, _, _ = lmoe()
    for key in ("env-key", "other-key"):
        ok = chat(router_url, key)
        assert ok.status_code == 200, ok.text
    assert chat(router_url, "flag-key").status_code == 401
    assert chat(router_url, None).status_code == 401


@pytest.mark.parametrize("env_keys", [None, "env-key"])
def test_the_inference_app_needs_the_internal_key(
    lmoe: Any, monkeypatch: pytest.MonkeyPatch, env_keys: str | None
) -> None:
    """Even with no client keys at all (the router open), the inference port behind it
    answers only to the key the router holds; client keys do not open it either."""
    if env_keys is None:
        monkeypatch.delenv("AIROBOROS_API_KEYS", raising=False)
    else:
        monkeypatch.setenv("AIROBOROS_API_KEYS", env_keys)
    router_url, inference_url, inference, router = lmoe()
    for key in (None, "env-key", "wrong"):
        headers = {"authorization": f"Bearer {key}"} if key is not None else {}
        r = httpx.post(f"{inference_url}/v1/chat/completions", json=CHAT, headers=headers)
        assert r.status_code == 401, (key, r.text)
        assert httpx.get(f"{inference_url}/v1/adapters", headers=headers).status_code == 401
        assert httpx.get(f"{inference_url}/v1/models", headers=headers).status_code == 401
    internal = inference.state.service.settings.api_keys
    assert internal and internal != env_keys and len(internal) >= 32
    assert router.state.service.backends.api_key == internal
    adapters = httpx.get(
        f"{inference_url}/v1/adapters", headers={"authorization": f"Bearer {internal}"}
    )
    assert adapters.status_code == 200
    # The router itself forwards with the internal key.
    ok = chat(router_url, env_keys)
    assert ok.status_code == 200, ok.text


def test_each_build_gets_a_fresh_internal_key(
    package: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIROBOROS_API_KEYS", raising=False)
    args = api.parse_args(["--base-model", str(package["base"]), "--lmoe", str(package["lmoe"])])
    first, _ = api.build(args, api.free_loopback_port())
    second, _ = api.build(args, api.free_loopback_port())
    a = first.state.service.settings.api_keys
    b = second.state.service.settings.api_keys
    assert a and b and a != b


def test_help_names_the_environment_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        api.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    start = text.index("--api-keys API_KEYS ")  # the options list, not the usage line
    flag_help = text[start : text.index("--debug", start)]
    assert "AIROBOROS_API_KEYS" in flag_help
    assert "wins" in flag_help


@pytest.mark.parametrize("keys", ["", "k1"])
def test_the_standalone_inference_app_warns_when_open(
    package: dict[str, Path], caplog: pytest.LogCaptureFixture, keys: str
) -> None:
    from airoboros.inference.app import create_app
    from airoboros.inference.settings import InferenceSettings

    with caplog.at_level(logging.WARNING, logger="airoboros.inference.app"):
        create_app(InferenceSettings(base_model=str(package["base"]), device="cpu", api_keys=keys))
    warned = [r for r in caplog.records if "accepts requests without a key" in r.getMessage()]
    assert bool(warned) == (not keys)
