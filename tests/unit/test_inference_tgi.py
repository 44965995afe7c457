"""The TGI backend against a fake text-generation-inference server (``/generate`` and
``/generate_stream`` as TGI shapes them), through the OpenAI SDK."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from airoboros.inference.app import create_app
from airoboros.inference.settings import InferenceSettings
from tests.fakes.asgi_server import AppServer

WORDS = [" says", " hello", " world", " USER:", " and", " more", " words", " here"]
MAX_TOTAL_TOKENS = 64


def fake_tgi(seen: list[dict[str, Any]]) -> FastAPI:
    """Tokens are words: the adapter's name (or "base"), then WORDS over and over. A prompt
    containing "EOS" ends after three tokens with the EOS token (special)."""
    app = FastAPI()
    adapters = {"qa", "code"}

    def run(body: dict[str, Any]) -> tuple[list[tuple[str, bool]], str, int] | JSONResponse:
        seen.append(body)
        inputs: str = body["inputs"]
        params: dict[str, Any] = body.get("parameters") or {}
        n_input = len(inputs.split())
        adapter = params.get("adapter_id")
        if adapter is not None and adapter not in adapters:
            return JSONResponse(
                {"error": f"adapter {adapter} not loaded", "error_type": "validation"}, 422
            )
        max_new = params.get("max_new_tokens")
        if max_new is None:
            max_new = MAX_TOTAL_TOKENS - n_input
        if n_input + max_new > MAX_TOTAL_TOKENS:
            return JSONResponse(
                {
                    "error": f"Input validation error: `inputs` tokens + `max_new_tokens` must "
                    f"be <= {MAX_TOTAL_TOKENS}. Given: {n_input} `inputs` tokens and "
                    f"{max_new} `max_new_tokens`",
                    "error_type": "validation",
                },
                422,
            )
        tokens: list[tuple[str, bool]] = []
        words = [adapter or "base", *WORDS * 20]
        finish = "length"
        for w in words:
            if len(tokens) == max_new:
                break
            if "EOS" in inputs and len(tokens) == 3:
                tokens.append(("</s>", True))
                finish = "eos_token"
                break
            tokens.append((w, False))
            text = "".join(t for t, _ in tokens)
            if any(s in text for s in params.get("stop") or []):
                finish = "stop_sequence"
                break
        return tokens, finish, n_input

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return {"model_id": "fake/tgi", "max_total_tokens": MAX_TOTAL_TOKENS}

    @app.post("/generate")
    async def generate(request: Request) -> Any:
        out = run(await request.json())
        if isinstance(out, JSONResponse):
            return out
        tokens, finish, n_input = out
        return {
            "generated_text": "".join(t for t, special in tokens if not special),
            "details": {
                "finish_reason": finish,
                "generated_tokens": len(tokens),
                "seed": None,
                "prefill": [{"id": i, "text": "w", "logprob": None} for i in range(n_input)],
                "tokens": [
                    {"id": i, "text": t, "logprob": -0.5, "special": s}
                    for i, (t, s) in enumerate(tokens)
                ],
            },
        }

    @app.post("/generate_stream")
    async def generate_stream(request: Request) -> Any:
        out = run(await request.json())
        if isinstance(out, JSONResponse):
            return out
        tokens, finish, n_input = out

        async def events() -> AsyncIterator[str]:
            for i, (t, special) in enumerate(tokens):
                last = i == len(tokens) - 1
                event = {
                    "index": i,
                    "token": {"id": i, "text": t, "logprob": -0.5, "special": special},
                    "generated_text": "".join(x for x, s in tokens if not s) if last else None,
                    "details": {
                        "finish_reason": finish,
                        "generated_tokens": len(tokens),
                        "seed": None,
                        "input_length": n_input,
                    }
                    if last
                    else None,
                }
                yield f"data:{json.dumps(event)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def tgi() -> Iterator[tuple[AppServer, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []
    fake = AppServer(fake_tgi(seen))
    with fake:
        settings = InferenceSettings(
            backend="tgi",
            tgi_url=fake.url,
            tgi_adapters="qa,code=/data/adapters/code",
            model_id="tgi-base",
            api_keys="",
        )
        with AppServer(create_app(settings)) as srv:
            yield srv, seen


def test_models(tgi: tuple[AppServer, list[dict[str, Any]]]) -> None:
    srv, _ = tgi
    models = {m.id: m.model_extra for m in srv.client().models.list().data}
    assert set(models) == {"tgi-base", "qa", "code"}
    assert models["code"] is not None and models["code"]["parent"] == "tgi-base"


def test_generate_with_adapter_id(tgi: tuple[AppServer, list[dict[str, Any]]]) -> None:
    srv, seen = tgi
    seen.clear()
    client = srv.client()
    resp = client.chat.completions.create(
        model="qa", messages=[{"role": "user", "content": "hi there"}], max_tokens=3, temperature=0
    )
    assert resp.choices[0].message.content == "qa says hello"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 3
    assert resp.usage.prompt_tokens == 6  # the fake counts words: A chat. USER: hi there ASSISTANT:
    body = seen[-1]
    assert body["inputs"] == "A chat.\nUSER: hi there\nASSISTANT: "
    assert body["parameters"]["adapter_id"] == "qa"
    assert body["parameters"]["do_sample"] is False
    base = client.completions.create(model="tgi-base", prompt="hello", max_tokens=2, temperature=0)
    assert base.choices[0].text == "base says"
    assert "adapter_id" not in seen[-1]["parameters"]


def test_stream_stop_usage_and_seeds(tgi: tuple[AppServer, list[dict[str, Any]]]) -> None:
    srv, seen = tgi
    seen.clear()
    client = srv.client()
    stream = client.chat.completions.create(
        model="code",
        messages=[{"role": "user", "content": "go"}],
        max_tokens=10,
        temperature=0.7,
        top_p=0.9,
        seed=5,
        n=2,
        stop=["USER:"],
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = ["", ""]
    finishes: list[str | None] = [None, None]
    usage = None
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            finishes[ch.index] = ch.finish_reason or finishes[ch.index]
        usage = c.usage or usage
    assert texts == ["code says hello world ", "code says hello world "]
    assert finishes == ["stop", "stop"]
    assert usage is not None
    assert usage.prompt_tokens == 5  # the fake's tokens are words: A chat. USER: go ASSISTANT:
    assert sorted(b["parameters"]["seed"] for b in seen) == [5, 6]
    assert all(b["parameters"]["stop"] == ["USER:"] for b in seen)
    assert all(b["parameters"]["adapter_id"] == "code" for b in seen)
    eos = client.chat.completions.create(
        model="qa",
        messages=[{"role": "user", "content": "EOS please"}],
        max_tokens=10,
        temperature=0,
    )
    assert eos.choices[0].message.content == "qa says hello"
    assert eos.choices[0].finish_reason == "stop"


def test_errors(tgi: tuple[AppServer, list[dict[str, Any]]]) -> None:
    srv, _ = tgi
    client = srv.client()
    long_prompt = "word " * 80
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="must be <=") as err:
            client.chat.completions.create(
                model="qa",
                messages=[{"role": "user", "content": long_prompt}],
                max_tokens=5,
                stream=stream,
            )
        assert err.value.code == "context_length_exceeded"
    # Without max_tokens the server's cap is too long for TGI: it retries with TGI's own limit.
    fits = client.chat.completions.create(
        model="qa", messages=[{"role": "user", "content": "short"}], temperature=0
    )
    assert fits.choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    r = httpx.post(f"{srv.url}/v1/adapters", json={"name": "new", "path": "/tmp/x"})
    assert r.status_code == 400 and "LORA_ADAPTERS" in r.json()["error"]["message"]


def test_api_keys(tgi: tuple[AppServer, list[dict[str, Any]]]) -> None:
    srv, _ = tgi
    fake_url = srv.app.state.backend.settings.tgi_url
    settings = InferenceSettings(backend="tgi", tgi_url=fake_url, api_keys="s3cret,other")
    with AppServer(create_app(settings)) as guarded:
        with pytest.raises(openai.AuthenticationError):
            guarded.client().models.list()
        ok = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="other", max_retries=0)
        assert [m.id for m in ok.models.list().data] == ["base"]
        assert httpx.get(f"{guarded.url}/healthz").status_code == 200
