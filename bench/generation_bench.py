"""Generation throughput against a rate-limited endpoint.

The scripted server answers after 2 s and allows 600 requests/min (10/s, bursts of one
second's worth). We run the embedded pipeline with requests_per_minute: 600 for a fixed
time and report, in one run:

* requests/min achieved as a fraction of the limit (target >= 0.95),
* the share of requests answered 429 (target <= 1%),
* the share of paid tokens that produced no kept row (duplicates, filtered answers, rows
  past a count).

    .venv/bin/python bench/generation_bench.py [--duration 60] [--latency 2] [--rpm 600]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airoboros.cli.embedded import Generation  # noqa: E402
from airoboros.config import parse_config  # noqa: E402
from airoboros.embeddings import SentenceTransformerEmbedder  # noqa: E402
from tests.fakes.llm_server import ADJS, NOUNS, Script, ScriptedLLM, ServerThread  # noqa: E402


async def run(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    embedder = SentenceTransformerEmbedder()
    embedder.embed(["warm up"])
    llm = ScriptedLLM(
        Script(latency=args.latency, rpm_limit=args.rpm, rpm_burst_seconds=1.0, duplicate_rate=0.05)
    )
    with ServerThread(llm) as srv, tempfile.TemporaryDirectory() as tmp:
        big = 100_000
        cfg = parse_config(
            {
                "model": "gpt-4",
                "openai_api_key": "sk-bench",
                "base_url": srv.base_url,
                "output_path": f"{tmp}/instructions.jsonl",
                "topics": [f"{a} {n}" for a in ADJS for n in NOUNS][:300],
                "requests_per_minute": args.rpm,
                "max_concurrency": args.concurrency,
                "request_timeout": 30,
                "instructors": {
                    "general": {"count": big, "batch_size": 5},
                    "writing": {"count": big, "batch_size": 5},
                    "coding": {"count": big, "batch_size": 5, "coding_languages": ["python", "go"]},
                    "trivia": {"count": big, "batch_size": 5},
                    "orca": {"count": big, "batch_size": 5},
                    "joke": {"count": big, "batch_size": 5},
                },
            }
        )
        gen = Generation(cfg, embedder=embedder, seed=1)
        job = asyncio.create_task(gen.run())
        while not llm.arrivals:
            await asyncio.sleep(0.05)
        t0 = llm.arrivals[0][0]
        await asyncio.sleep(args.duration)
        t1 = time.monotonic()
        ctl = gen.controller
        assert ctl is not None and gen.llm is not None
        await ctl.cancel("benchmark time is up")  # type: ignore[attr-defined]
        result = await job

    window = [(t, ok) for t, ok in llm.arrivals if t0 <= t <= t1]
    admitted = sum(1 for _, ok in window if ok)
    refused = sum(1 for _, ok in window if not ok)
    minutes = (t1 - t0) / 60
    achieved = admitted / minutes
    total_tokens = result.usage.total_tokens
    wasted = sum(v.wasted_tokens for v in result.states.values())
    batch_tokens = sum(v.tokens for v in result.states.values())
    print(
        f"latency {args.latency}s, limit {args.rpm:.0f} req/min, window {t1 - t0:.1f}s, torch threads {args.threads}"
    )
    print(f"requests sent {len(window)}, admitted {admitted}, answered 429: {refused}")
    print(f"rows stored {result.rows}, tokens paid {total_tokens:,}, in batches {batch_tokens:,}")
    fraction = achieved / args.rpm
    share_429 = refused / max(1, len(window))
    waste = wasted / max(1, total_tokens)
    print(
        f"generation: {achieved:.1f} req/min = {fraction:.3f} of the limit (target >= 0.95), "
        f"429 share {share_429:.2%} (target <= 1%), paid tokens without a kept row {waste:.1%}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--latency", type=float, default=2.0)
    p.add_argument("--rpm", type=float, default=600.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
