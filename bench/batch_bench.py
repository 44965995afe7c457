"""The same job online and through the Batch API lane: cost by the price table and wall time.

One config (general: a task list, then a response per task; trivia, joke, riddle: pairs in
one call; 20 rows each; a topics file), one seed, the scripted server (latency
``--latency`` per online call; each batch job ``--state-seconds`` in each of validating,
in_progress and finalizing). The job runs once online and once with ``batch: true``. It
prints per run: rows, requests, tokens, cost by the price table (gpt-4: $30/$60 per
million tokens; batch lines at its 0.5 discount) and wall time; then the cost ratio
batch/online (target 0.5), and, as a check that the ratio is the discount and not the
sampling, the batch run's cost against the online price of its own tokens.

    .venv/bin/python bench/batch_bench.py [--count 20] [--latency 0.2] [--state-seconds 0.5]
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airoboros.cli.embedded import Generation  # noqa: E402
from airoboros.config import parse_config  # noqa: E402
from airoboros.embeddings import SentenceTransformerEmbedder  # noqa: E402
from tests.fakes.llm_server import ADJS, NOUNS, Script, ScriptedLLM, ServerThread  # noqa: E402

CATEGORIES = ("general", "trivia", "joke", "riddle")
PROMPT, COMPLETION = 30.0, 60.0  # gpt-4, USD per million tokens


def config(tmp: Path, base_url: str, count: int, **extra: Any) -> dict[str, Any]:
    topics = tmp / "topics.txt"
    topics.write_text("\n".join(f"{a} {n}s" for a in ADJS for n in NOUNS[:20]) + "\n")
    return {
        "model": "gpt-4",
        "openai_api_key": "sk-bench",
        "base_url": base_url,
        "output_path": str(tmp / "instructions.jsonl"),
        "topics_path": str(topics),
        "request_timeout": 30,
        "default_batch_size": 5,
        "instructors": {n: {"count": count} for n in CATEGORIES},
        **extra,
    }


async def one_run(args: argparse.Namespace, embedder: Any, *, batch: bool) -> dict[str, Any]:
    script = Script(latency=args.latency, seed=args.seed, batch_state_seconds=args.state_seconds)
    llm = ScriptedLLM(script)
    extra = {"batch": True, "batch_poll_interval": 0.1} if batch else {}
    with ServerThread(llm) as srv, tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(config(Path(tmp), srv.base_url, args.count, **extra))
        t0 = time.monotonic()
        result = await Generation(cfg, embedder=embedder, seed=args.seed).run()
        wall = time.monotonic() - t0
    return {
        "status": result.status,
        "rows": result.rows,
        "requests": result.usage.requests,
        "prompt_tokens": result.usage.prompt_tokens,
        "completion_tokens": result.usage.completion_tokens,
        "cost": result.usage.cost,
        "online_price": (
            result.usage.prompt_tokens * PROMPT + result.usage.completion_tokens * COMPLETION
        )
        / 1e6,
        "wall": wall,
        "batches": llm.stats["batches_created"],
        "batch_lines": llm.stats["batch_lines"],
    }


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--state-seconds", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    embedder = SentenceTransformerEmbedder()
    runs = {
        "online": await one_run(args, embedder, batch=False),
        "batch": await one_run(args, embedder, batch=True),
    }
    print(f"{len(CATEGORIES)} instructors x {args.count} rows, seed {args.seed}")
    for name, r in runs.items():
        print(
            f"{name:>6}: {r['status']}, {r['rows']} rows, {r['requests']} requests "
            f"({r['batch_lines']} batch lines in {r['batches']} batch jobs), "
            f"{r['prompt_tokens']:,}+{r['completion_tokens']:,} tokens, "
            f"cost ${r['cost']:.4f} (online price of these tokens ${r['online_price']:.4f}), "
            f"wall {r['wall']:.1f} s"
        )
    on, ba = runs["online"], runs["batch"]
    ratio = ba["cost"] / on["cost"] if on["cost"] else float("nan")
    per_row = (ba["cost"] / max(1, ba["rows"])) / (on["cost"] / max(1, on["rows"]))
    own = ba["cost"] / ba["online_price"] if ba["online_price"] else float("nan")
    print(f"cost per row batch/online = {per_row:.3f}; batch cost / its tokens online = {own:.3f}")
    print(
        f"batch: cost ratio = {ratio:.3f} (target 0.5), "
        f"wall online = {on['wall']:.1f} s, batch = {ba['wall']:.1f} s"
    )


if __name__ == "__main__":
    asyncio.run(main())
