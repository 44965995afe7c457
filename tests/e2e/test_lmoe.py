"""``python -m airoboros.lmoe.api`` with the original's flags: router and inference in one
process, a tiny Llama with two experts, the real OpenAI SDK as the client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.e2e.helpers import LMOE_SAMPLES as SAMPLES
from tests.e2e.helpers import REPO, cli_env
from tests.fakes.tiny_llama import build_tiny_llama
from tests.unit.test_inference import make_adapter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def lmoe_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("lmoe")
    base = build_tiny_llama(root / "tiny-llama", initializer_range=0.1)
    pkg = root / "package"
    for seed, (expert, samples) in enumerate(SAMPLES.items(), 1):
        make_adapter(base, pkg / "adapters" / expert, seed, description=f"the {expert} expert")
        routing = pkg / "routing_data" / f"expert_{expert}.jsonl"
        routing.parent.mkdir(parents=True, exist_ok=True)
        routing.write_text(
            "".join(json.dumps({"instruction": f"A chat. {s}"}) + "\n" for s in samples)
        )
    port = free_port()
    log = (root / "lmoe.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "airoboros.lmoe.api", "--base-model", str(base), "--lmoe", str(pkg),
         "--router-k", "3", "--router-max-samples", "100", "--port", str(port)],
        cwd=REPO,
        env=cli_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (root / "lmoe.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError((root / "lmoe.log").read_text()[-3000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_list_every_expert_and_auto(lmoe_server: str) -> None:
    ids = {m.id for m in client(lmoe_server).models.list()}
    assert {"code", "cooking", "auto"} <= ids


@pytest.mark.parametrize("expert", ["code", "cooking"])
def test_auto_routes_to_the_expert_the_prompt_resembles(lmoe_server: str, expert: str) -> None:
    prompt = {
        "code": "Write a Rust function that parses a CSV line.",
        "cooking": "How do I make a fluffy pancake batter?",
    }[expert]
    raw = client(lmoe_server).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=5
    )
    assert raw.headers["x-airoboros-expert"] == expert
    completion = raw.parse()
    assert completion.choices[0].message.content is not None
    assert completion.usage is not None and completion.usage.completion_tokens <= 5


def test_explicit_model_and_expert_field_override_routing(lmoe_server: str) -> None:
    c = client(lmoe_server)
    cooking_prompt = [{"role": "user", "content": "Give me a recipe for lentil soup."}]
    raw = c.chat.completions.with_raw_response.create(
        model="code", messages=cooking_prompt, max_tokens=3
    )
    assert raw.headers["x-airoboros-expert"] == "code"
    raw = c.chat.completions.with_raw_response.create(
        model="auto", messages=cooking_prompt, max_tokens=3, extra_body={"expert": "code"}
    )
    assert raw.headers["x-airoboros-expert"] == "code"


def test_streaming_through_the_router(lmoe_server: str) -> None:
    stream = client(lmoe_server).chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": "Write a python function that sorts a list."}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert isinstance(text, str)


def test_unknown_model_is_a_404(lmoe_server: str) -> None:
    with pytest.raises(openai.NotFoundError):
        client(lmoe_server).chat.completions.create(
            model="astrology", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )


async def test_64_concurrent_streams_match_solo_runs(lmoe_server: str) -> None:
    """64 streams across both experts at once, each identical to the same request
    (same seed) run alone: batching across adapters changes nothing."""
    import asyncio

    aclient = openai.AsyncOpenAI(
        base_url=f"{lmoe_server}/v1", api_key="unused", max_retries=0, timeout=300
    )

    def request(i: int) -> dict[str, object]:
        return {
            "model": "code" if i % 2 else "cooking",
            "messages": [{"role": "user", "content": f"Tell me about item {i}."}],
            "max_tokens": 8,
            "temperature": 0.0 if i % 4 < 2 else 0.9,
            "seed": 1000 + i,
        }

    async def run(i: int) -> str:
        stream = await aclient.chat.completions.create(stream=True, **request(i))  # type: ignore[call-overload]
        return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    together = await asyncio.gather(*(run(i) for i in range(64)))
    alone = [await run(i) for i in range(64)]
    await aclient.close()
    assert together == alone
    assert len(set(alone)) > 1  # the two experts and the seeds really differ


def test_response_format_passes_through_to_constrained_decoding(lmoe_server: str) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "dish": {"type": "string", "maxLength": 12},
            "minutes": {"type": "integer", "minimum": 1, "maximum": 99},
        },
        "required": ["dish", "minutes"],
        "additionalProperties": False,
    }
    c = client(lmoe_server)
    for stream in (False, True):
        kw: dict[str, object] = {
            "model": "auto",
            "messages": [{"role": "user", "content": "A recipe and its time, as JSON."}],
            "max_tokens": 200,
            "seed": 3,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "recipe", "schema": schema},
            },
        }
        if stream:
            text = "".join(
                (ch.choices[0].delta.content or "") if ch.choices else ""
                for ch in c.chat.completions.create(**kw, stream=True)  # type: ignore[call-overload]
            )
        else:
            text = c.chat.completions.create(**kw).choices[0].message.content or ""  # type: ignore[call-overload]
        jsonschema.validate(json.loads(text), schema)
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(
            model="auto",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            response_format={"type": "xml"},  # type: ignore[arg-type, typeddict-item]
        )
    assert "response_format" in str(info.value)
