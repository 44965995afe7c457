"""The main job against a faulty endpoint, against the same job on a clean one.

The config of the side-by-side run (general, trivia, riddle, joke, wordgame; 20 rows each;
trivia 20 pairs per call; a topics file) against the scripted server at 0.3-0.5 s latency,
clean and faulty (10% of calls 429 with Retry-After 1 s, 5% 500, 10% of answers refused,
10% of items repeated), over several seeds, in one process. It prints, per profile:

* completion: runs that ended done with exact counts (target 5/5),
* tokens billed per kept row, and faulty/clean (target <= 1.3x),
* the share of billed tokens that bought no kept row (target <= 5% clean, <= 15% faulty),
* billed/budget for a faulty run with max_tokens: 10000 (target <= 1.0),

and the time from starting `airoboros generate-instructions` to its first LLM request,
against a plain `openai` SDK script that sends one request (the floor), median of runs.

    .venv/bin/python bench/faults_bench.py [--seeds 5] [--count 20] [--latency 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from airoboros.cli.embedded import Generation  # noqa: E402
from airoboros.config import parse_config  # noqa: E402
from airoboros.embeddings import SentenceTransformerEmbedder  # noqa: E402
from tests.fakes.llm_server import ADJS, NOUNS, Script, ScriptedLLM, ServerThread  # noqa: E402

FAULTY: dict[str, Any] = {
    "rate_429": 0.10,
    "retry_after": 1.0,
    "error_500_rate": 0.05,
    "answer_refusal_rate": 0.10,
    "duplicate_rate": 0.10,
}
CATEGORIES = ("general", "trivia", "riddle", "joke", "wordgame")


def config(tmp: Path, base_url: str, count: int, **extra: Any) -> dict[str, Any]:
    topics = tmp / "topics.txt"
    if not topics.exists():
        topics.write_text("\n".join(f"{a} {n}s" for a in ADJS for n in NOUNS[:20]) + "\n")
    return {
        "model": "gpt-4",
        "openai_api_key": "sk-bench",
        "base_url": base_url,
        "output_path": str(tmp / "instructions.jsonl"),
        "topics_path": str(topics),
        "request_timeout": 30,
        "instructors": {
            n: {"count": count, **({"batch_size": 20} if n == "trivia" else {})} for n in CATEGORIES
        },
        **extra,
    }


async def one_run(
    profile: dict[str, Any], seed: int, args: argparse.Namespace, embedder: Any, **extra: Any
) -> dict[str, Any]:
    llm = ScriptedLLM(Script(latency=args.latency, latency_jitter=0.2, seed=seed, **profile))
    with ServerThread(llm) as srv, tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(config(Path(tmp), srv.base_url, args.count, **extra))
        t0 = time.monotonic()
        result = await Generation(cfg, embedder=embedder, seed=seed).run()
        wall = time.monotonic() - t0
        rows = Path(cfg.output_path)
        counts = Counter(
            json.loads(line)["category"]
            for line in (rows.read_text().splitlines() if rows.exists() else [])
        )
    billed = llm.stats["prompt_tokens"] + llm.stats["completion_tokens"]
    exact = counts == {n: args.count for n in CATEGORIES}
    return {
        "status": result.status,
        "complete": result.status == "done" and exact,
        "rows": result.rows,
        "billed": billed,
        "wasted": sum(v.wasted_tokens for v in result.states.values()),
        "requests": llm.stats["requests"],
        "retries": result.retries,
        "wall": wall,
    }


def first_request_seconds(cmd: list[str], env: dict[str, str], llm: ScriptedLLM) -> float:
    """From starting ``cmd`` to the first completion request reaching the server."""
    seen = len(llm.arrivals)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while len(llm.arrivals) == seen:
            if proc.poll() is not None and len(llm.arrivals) == seen:
                raise RuntimeError(f"{cmd[:3]} exited with {proc.returncode} before a request")
            time.sleep(0.002)
        return llm.arrivals[seen][0] - t0
    finally:
        proc.kill()
        proc.wait()


def startup(args: argparse.Namespace) -> tuple[float, float]:
    llm = ScriptedLLM(Script(latency=args.latency))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    ours, floor = [], []
    with ServerThread(llm) as srv, tempfile.TemporaryDirectory() as tmp:
        plain = (
            "import openai\n"
            f"c = openai.OpenAI(base_url={srv.base_url!r}, api_key='sk-bench')\n"
            "c.chat.completions.create(model='gpt-4', "
            "messages=[{'role': 'user', 'content': 'Tell me a joke.'}])\n"
        )
        for i in range(args.startup_runs):
            run_dir = Path(tmp) / f"run{i}"
            run_dir.mkdir()
            path = run_dir / "config.yaml"
            path.write_text(yaml.safe_dump(config(run_dir, srv.base_url, 5)))
            cli = [sys.executable, "-m", "airoboros.cli", "generate-instructions", "-c", str(path)]
            ours.append(first_request_seconds(cli, env, llm))
            floor.append(first_request_seconds([sys.executable, "-c", plain], env, llm))
    return statistics.median(ours), statistics.median(floor)


async def run(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    embedder = SentenceTransformerEmbedder()
    embedder.embed(["warm up"])
    seeds = list(range(1, args.seeds + 1))
    print(
        f"{len(CATEGORIES)} categories x {args.count} rows, latency {args.latency}-"
        f"{args.latency + 0.2} s, seeds {seeds}, torch threads {args.threads}"
    )
    per: dict[str, list[dict[str, Any]]] = {}
    for name, profile in (("clean", {}), ("faulty", FAULTY)):
        per[name] = []
        for seed in seeds:
            r = await one_run(profile, seed, args, embedder)
            per[name].append(r)
            print(
                f"  {name:<6} seed {seed}: {r['status']:<10} rows {r['rows']:>4}  "
                f"requests {r['requests']:>4} (retried {r['retries']:>3})  billed "
                f"{r['billed']:>7,} tokens  wasted {r['wasted'] / max(1, r['billed']):5.1%}  "
                f"{r['wall']:5.1f} s"
            )
    budget = 10_000
    billed_ratio = []
    for seed in seeds:
        r = await one_run(FAULTY, seed, args, embedder, max_tokens=budget)
        billed_ratio.append(r["billed"] / budget)
        print(f"  budget {budget:,}, seed {seed}: {r['status']}, billed {r['billed']:,}")

    def tokens_per_row(runs: list[dict[str, Any]]) -> float:
        return sum(r["billed"] for r in runs) / max(1, sum(r["rows"] for r in runs))

    def waste(runs: list[dict[str, Any]]) -> float:
        return sum(r["wasted"] for r in runs) / max(1, sum(r["billed"] for r in runs))

    done = {k: sum(r["complete"] for r in v) for k, v in per.items()}
    tpr = {k: tokens_per_row(v) for k, v in per.items()}
    for k in per:
        print(
            f"{k}: completed {done[k]}/{len(seeds)}, {tpr[k]:.0f} tokens per kept row, "
            f"{waste(per[k]):.1%} of billed tokens bought no kept row, wall "
            f"{statistics.mean(r['wall'] for r in per[k]):.1f} s"
        )
    ours, floor = startup(args)
    print(
        f"time to first request: ours {ours:.2f} s, plain openai script {floor:.2f} s "
        f"(median of {args.startup_runs})"
    )
    print(
        f"faults: completed {done['faulty']}/{len(seeds)} (target {len(seeds)}/{len(seeds)}), "
        f"tokens/row faulty/clean = {tpr['faulty'] / tpr['clean']:.2f}x (target 1.3x), "
        f"waste clean {waste(per['clean']):.1%} (target 5%) faulty {waste(per['faulty']):.1%} "
        f"(target 15%), billed/budget max {max(billed_ratio):.3f} (target 1.0), "
        f"first request {ours / floor:.2f}x the floor"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--latency", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--startup-runs", type=int, default=3)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
