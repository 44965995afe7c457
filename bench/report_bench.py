"""What the quality report costs, against reading the same job's rows once.

A job of --n rows over --categories categories (instructions of varied words, a 384-dim
dedupe vector each, as all-MiniLM-L6-v2 makes) in a fresh SQLite store. Baseline: read
every row and serialise it as JSONL, as the export does (``RowRepository.iterate``).
Ours: ``airoboros.report.build_report`` on the same store (counters, a random sample of
2,000 instructions per category, every dedupe vector loaded, 1,000 nearest-neighbour
queries per index). Prints both wall times, the ratio, and the report's figures. Wall
clock on a possibly shared machine: the load average is printed. Reports only; exits 0.

    .venv/bin/python bench/report_bench.py [--n 20000] [--categories 4] [--dim 384]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
import uuid

import numpy as np

from airoboros.contracts import BatchStats, Item
from airoboros.report import build_report
from airoboros.store import SqlStore

WORDS = [
    "write",
    "explain",
    "describe",
    "list",
    "compare",
    "summarise",
    "translate",
    "design",
    "plan",
    "imagine",
    "the",
    "a",
    "of",
    "river",
    "mountain",
    "city",
    "poem",
    "story",
    "function",
    "database",
    "recipe",
    "history",
    "planet",
    "market",
    "garden",
    "engine",
    "language",
    "music",
    "theory",
    "ocean",
    "forest",
    "bridge",
    "letter",
    "proof",
    "puzzle",
]
CATEGORIES = ("general", "coding", "joke", "riddle", "trivia", "wordgame", "orca", "writing")


async def main(n: int, categories: int, dim: int) -> None:
    rng, nrng = random.Random(0), np.random.default_rng(0)
    names = CATEGORIES[:categories]
    per = n // len(names)
    with tempfile.TemporaryDirectory() as tmp:
        store = SqlStore(f"sqlite+aiosqlite:///{tmp}/bench.sqlite")
        await store.connect()
        await store.jobs.ensure("bench", config={}, targets=dict.fromkeys(names, per))
        for name in names:
            for start in range(0, per, 1000):
                k = min(1000, per - start)
                items = [
                    Item(
                        instruction=" ".join(rng.choice(WORDS) for _ in range(12)),
                        response="an answer",
                        category=name,
                    )
                    for _ in range(k)
                ]
                await store.rows.apply_batch(
                    "bench",
                    message_id=uuid.uuid4().hex,
                    task_id=uuid.uuid4().hex,
                    instructor=name,
                    items=items,
                    stats=BatchStats(proposed=k, requests=1, prompt_tokens=100, cost=0.01),
                )
                v = nrng.normal(size=(k, dim)).astype(np.float32)
                v /= np.linalg.norm(v, axis=1, keepdims=True)
                keys = [f"{name}:{uuid.uuid4().hex}" for _ in range(k)]
                await store.vectors.add("bench", keys, v)

        t = time.perf_counter()
        size = 0
        async for row in store.rows.iterate("bench"):
            size += len(json.dumps(row.item.to_row()))
        base = time.perf_counter() - t

        t = time.perf_counter()
        report = await build_report(store, "bench")
        ours = time.perf_counter() - t
        await store.close()

    print(f"load average {os.getloadavg()[0]:.2f}; {n} rows, {len(names)} categories, dim {dim}")
    print(f"  read every row as JSONL ({size / 1e6:.1f} MB): {base:6.2f} s")
    print(f"  build the quality report:            {ours:6.2f} s")
    print(f"  ratio report / full read: {ours / base:.2f}")
    d = report.totals.diversity
    print(
        f"  totals: kept {report.totals.kept}, distinct-2 {d.distinct_2}, "
        f"zlib {d.compression_ratio}, nn cosine {d.nn_cosine} ({d.nn_sampled} queries)"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--categories", type=int, default=4)
    ap.add_argument("--dim", type=int, default=384)
    a = ap.parse_args()
    asyncio.run(main(a.n, min(a.categories, len(CATEGORIES)), a.dim))
