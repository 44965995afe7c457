"""The real SmolLM2-135M-Instruct through the inference service and the router: sensible
greedy answers in both prompt formats, multi-byte streaming, batching that changes nothing
(with two adapters in one batch), and an adapter published while serving."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.slow.conftest import EXPERTS, KEY, chat

CAPITAL = "What is the capital of France? Answer in one word."
UNICODE = "café naïve 東京"


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)


def test_chat_template_answers_sensibly_over_http(inference: str) -> None:
    assert "Paris" in chat(inference, CAPITAL)
    assert "4" in chat(inference, "What is 2 + 2? Answer with the number only.", max_tokens=8)


def test_airoboros_format_answers_sensibly_over_http(inference_airoboros: str) -> None:
    assert "Paris" in chat(inference_airoboros, CAPITAL)


def test_router_with_the_openai_sdk_answers_sensibly(
    routed: tuple[str, Any], inference: str
) -> None:
    url, _ = routed
    completion = sdk(url).chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": CAPITAL}],
        max_tokens=12,
        temperature=0.0,
    )
    text = completion.choices[0].message.content or ""
    assert "Paris" in text
    assert text == chat(inference, CAPITAL)  # the router adds nothing to the answer
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 12


MULTIBYTE = {
    # prompt: text the answer must contain (2-, 3- and 4-byte UTF-8 split over tokens)
    f"Repeat exactly: {UNICODE}": "naïve",
    "Repeat exactly: I love \u2615 and \U0001f355": "\u2615 and \U0001f355",
    # a Japanese answer cut by max_tokens (the last character may be incomplete)
    "How do you say 'thank you' in Japanese?": "\u304f",
}


@pytest.mark.parametrize("prompt", list(MULTIBYTE))
@pytest.mark.parametrize("via", ["inference", "router"])
def test_streaming_decodes_multibyte_text(
    via: str, prompt: str, inference: str, routed: tuple[str, Any]
) -> None:
    """The stream's deltas add up to the answer not streamed, and no delta holds a broken
    character (U+FFFD) even where one character spans several tokens."""
    url = inference if via == "inference" else routed[0]
    kw: dict[str, Any] = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 24,
        "temperature": 0.0,
    }
    whole = sdk(url).chat.completions.create(**kw).choices[0].message.content or ""
    deltas = [
        ch.choices[0].delta.content or ""
        for ch in sdk(url).chat.completions.create(stream=True, **kw)
        if ch.choices
    ]
    streamed = "".join(deltas)
    assert streamed == whole
    assert "\ufffd" not in streamed, streamed
    assert MULTIBYTE[prompt] in streamed, streamed  # the non-ASCII text came through
    assert len([d for d in deltas if d]) > 1  # really streamed, in several pieces


PROMPTS = [
    "What is the capital of France?",
    "Name a fruit that is yellow.",
    "Write one sentence about the sea.",
    "What is 3 + 5?",
    "Translate 'thank you' into French.",
    "Say hello.",
]


def test_batched_and_alone_greedy_outputs_agree_across_adapters(inference: str) -> None:
    """The same greedy requests one at a time and all at once in the continuous batch
    (the base model and two different LoRAs mixed) give the same texts."""
    models = ["smollm2", *EXPERTS]
    requests = [(models[i % len(models)], p) for i, p in enumerate(PROMPTS * 2)]

    async def run(client: openai.AsyncOpenAI, model: str, prompt: str) -> str:
        c = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=10,
            temperature=0.0,
        )
        return c.choices[0].message.content or ""

    async def both() -> tuple[list[str], list[str]]:
        async with openai.AsyncOpenAI(
            base_url=f"{inference}/v1", api_key=KEY, max_retries=0, timeout=600
        ) as client:
            alone = [await run(client, m, p) for m, p in requests]
            together = await asyncio.gather(*(run(client, m, p) for m, p in requests))
        return alone, list(together)

    alone, together = asyncio.run(both())
    assert together == alone
    by_model = {
        m: [t for (mm, _), t in zip(requests, alone, strict=True) if mm == m] for m in models
    }
    assert by_model["smollm2"] != by_model["alpha"] != by_model["beta"]  # the adapters act


def test_a_published_adapter_is_served_and_routed_without_restart(
    trained: dict[str, Any], routed: tuple[str, Any], inference: str, published_root: Path
) -> None:
    from airoboros.contracts import AdapterPublished

    url, router = routed
    expert, folder = "alpaca", Path(trained["adapter_dir"])
    prompt = trained["held_out_prompt"]
    assert expert not in {m.id for m in sdk(url).models.list()}
    r = httpx.post(
        f"{inference}/v1/adapters",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"name": expert, "path": str(folder)},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    asyncio.run(
        router.on_adapter_published(
            AdapterPublished(
                expert=expert,
                version="v1",
                base_model="smollm2",
                uri=str(folder),
                routing_uri=str(trained["routing_file"]),
                description="follows general instructions (alpaca)",
            )
        )
    )
    assert expert in {m.id for m in sdk(url).models.list()}
    answer = sdk(url).chat.completions.create(
        model=expert,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=16,
        temperature=0.0,
    )
    text = answer.choices[0].message.content or ""
    assert text != chat(inference, prompt, max_tokens=16)  # not the base model's answer
    assert text == chat(inference, prompt, model=expert, max_tokens=16)
    raw = sdk(url).chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": trained["routing_like_prompt"]}],
        max_tokens=4,
        temperature=0.0,
    )
    assert raw.headers["x-airoboros-expert"] == expert
