"""Structured vs marker output through our inference service with a small model.

Serves a random-weight Llama (tests/fakes/tiny_llama.py; the real-weights issue replaces it
later) with our inference service on a loopback port, and sends the same instructor
prompts two ways, ``--calls`` of each, all at once (continuous batching):

* **markers**: the packaged prompt as it is (``TSK n.`` task lists, ``QUESTION:``/
  ``ANSWER:`` pairs), read by the instructors' marker parsers;
* **json_schema**: the prompt with its format block replaced by the JSON shape and
  ``response_format`` set to the instructor's schema (what ``structured_output`` sends),
  read by the same JSON reader the instructors use.

It prints, per mode, the share of calls that yield at least one parseable item, and the
decode speed (completion tokens/s, wall clock, same batch shape) of constrained vs
unconstrained generation. Last line:

    structured: parseable share json_schema = X, markers = Y; constrained/unconstrained tokens/s = Z

    .venv/bin/python bench/structured_bench.py [--calls 24] [--max-tokens 192] [--hidden 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASE_ID = "tiny-base"


def prompts(calls: int) -> list[tuple[str, Any, Any]]:
    """(rendered prompt, shape, marker parser) for ``calls`` calls, alternating a task
    list (general) and pairs (trivia), as the instructors render them."""
    from airoboros.generator.instructors.base import load_prompt, parse_pairs, parse_tasks
    from airoboros.generator.instructors.structured import TASKS, pairs
    from airoboros.templates import render

    values = {
        "batch_size": 3,
        "language": "English",
        "flesch": "",
        "topic_avoidance": "",
        "topics": "",
    }
    general = render(load_prompt("general.txt"), **values)
    trivia = render(load_prompt("trivia.txt"), **values)
    out: list[tuple[str, Any, Any]] = []
    for i in range(calls):
        if i % 2 == 0:
            out.append((general, TASKS, lambda t: [(x,) for x in parse_tasks(t)]))
        else:
            out.append((trivia, pairs("QUESTION", "ANSWER"), parse_pairs))
    return out


async def run_mode(
    url: str, work: list[tuple[str, Any, Any]], structured: bool, max_tokens: int
) -> tuple[float, int, float]:
    """(share of calls with >= 1 item, completion tokens, seconds)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)

    async def one(i: int, prompt: str, shape: Any, markers: Any) -> tuple[bool, int]:
        kw: dict[str, Any] = {
            "model": BASE_ID,
            "messages": [
                {"role": "user", "content": shape.prompt(prompt) if structured else prompt}
            ],
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "seed": i,
        }
        if structured:
            kw["response_format"] = shape.response_format()
        r = await client.chat.completions.create(**kw)
        text = r.choices[0].message.content or ""
        truncated = r.choices[0].finish_reason == "length"
        items = shape.parse(text, truncated) if structured else markers(text)
        return bool(items), r.usage.completion_tokens if r.usage else 0

    start = time.perf_counter()
    try:
        got = await asyncio.gather(*(one(i, *w) for i, w in enumerate(work)))
    finally:
        await client.close()
    seconds = time.perf_counter() - start
    share = sum(ok for ok, _ in got) / max(1, len(got))
    return share, sum(t for _, t in got), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=192)
    p.add_argument("--hidden", type=int, default=64)
    args = p.parse_args()
    from airoboros.inference.app import create_app
    from airoboros.inference.engine import LocalEngine
    from airoboros.inference.settings import InferenceSettings
    from tests.fakes.asgi_server import AppServer
    from tests.fakes.tiny_llama import build_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_llama(Path(tmp) / BASE_ID, hidden=args.hidden)
        settings = InferenceSettings(
            base_model=str(base),
            model_id=BASE_ID,
            cache_dir=str(Path(tmp) / "cache"),
            device="cpu",
            api_keys="",
            max_batch_size=max(8, args.calls),
        )
        work = prompts(args.calls)
        with AppServer(create_app(settings, engine=LocalEngine(settings))) as srv:
            # One warm-up call of each kind (model load, schema compile).
            asyncio.run(run_mode(srv.url, work[:2], True, 8))
            asyncio.run(run_mode(srv.url, work[:2], False, 8))
            m_share, m_tokens, m_s = asyncio.run(run_mode(srv.url, work, False, args.max_tokens))
            j_share, j_tokens, j_s = asyncio.run(run_mode(srv.url, work, True, args.max_tokens))
    m_tps, j_tps = m_tokens / m_s, j_tokens / j_s
    print(
        f"calls per mode: {args.calls} (general and trivia prompts), max_tokens {args.max_tokens}"
    )
    print(
        f"markers:     parseable share {m_share:.2f}, {m_tokens} tokens in {m_s:.1f} s, {m_tps:.0f} tokens/s"
    )
    print(
        f"json_schema: parseable share {j_share:.2f}, {j_tokens} tokens in {j_s:.1f} s, {j_tps:.0f} tokens/s"
    )
    print(
        f"structured: parseable share json_schema = {j_share:.2f}, markers = {m_share:.2f}; "
        f"constrained/unconstrained tokens/s = {j_tps / max(m_tps, 1e-9):.2f}"
    )


if __name__ == "__main__":
    main()
