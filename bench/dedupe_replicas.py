"""One job's dedupe on 1, 2 and 4 dedupe replicas, against the machine's embedding limit.

Each replica is a separate ``python -m airoboros.dedupe`` process on the local RabbitMQ
and PostgreSQL, consuming the unpartitioned dedupe topic (AIROBOROS_DEDUPE_PARTITIONS=1:
competing consumers; check-and-insert under the job's PostgreSQL advisory lock), with
AIROBOROS_EMBEDDING_THREADS=--threads torch threads (and OMP_NUM_THREADS the same). The
job: the first --n alpaca_5000 items (instruction, plus "\\n" + input when non-empty) in
CandidatesProposed messages of --batch candidates, all published at once after every
replica consumes and has embedded a warm-up job; timed from the first publish to the
last verdict. The threshold is the instructors' default (min_docsearch_score 0.35 as a
cosine: 0.825). Afterwards the accepted vectors are checked pairwise: no two may be
near-duplicates.

The embedding limit, measured in the same run on the same texts: all-MiniLM-L6-v2 in
``SentenceTransformerEmbedder.embed`` (the product's embedder) at full batches (256 texts
a call, in forward passes of up to 512 padded tokens), in --limit-procs processes of
--threads threads each, all at once: texts/s and forward passes/s, summed. By default as
many processes as the machine has cores, i.e. what the machine can embed with the
replicas' thread setting.

    .venv/bin/python bench/dedupe_replicas.py [--replicas 1,2,4] [--n 3000] [--batch 50]
                                              [--threads 1] [--batch-wait-ms 10]
                                              [--concurrency 8]

``replica_figures(...)`` returns the figures as a dict (bench/dedupe_scale_bench.py uses
it). Timings are wall-clock on a possibly shared machine: the load average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "alpaca_5000.json"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"
THRESHOLD = 0.825  # l2_threshold_to_cosine(0.35), the instructors' default


def load_texts(n: int, path: Path = DATA) -> list[str]:
    rows = json.loads(path.read_text())
    texts = [r["instruction"] + ("\n" + r["input"] if r.get("input") else "") for r in rows]
    return texts[:n]


def _child_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AIROBOROS_"))}
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
        }
    )
    return env


# --- the embedding limit --------------------------------------------------------------


def _limit_worker(threads: int, seconds: float, n: int) -> None:
    """In a child process: embed full batches for ``seconds``; print a JSON line."""
    import torch

    from airoboros.embeddings import SentenceTransformerEmbedder

    torch.set_num_threads(threads)
    embedder = SentenceTransformerEmbedder()
    passes = 0
    prepare = embedder._prepare

    def counting(texts: list[str]) -> dict[str, Any]:
        nonlocal passes
        passes += 1
        return prepare(texts)

    embedder._prepare = counting  # type: ignore[method-assign]
    texts = load_texts(n)
    batches = [texts[i : i + 256] for i in range(0, len(texts) - 255, 256)]
    embedder.embed(batches[0])  # warm-up
    print("READY", flush=True)
    sys.stdin.readline()  # start together with the others
    passes, done, k = 0, 0, 0
    cpu0 = time.process_time()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        b = batches[k % len(batches)]
        embedder.embed(b)
        done += len(b)
        k += 1
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    print(
        json.dumps({"texts": done, "passes": passes, "seconds": elapsed, "cpu": cpu}),
        flush=True,
    )


def embedding_limit(procs: int, threads: int, seconds: float = 15.0, n: int = 3000) -> dict:
    """Texts/s and forward passes/s of ``procs`` processes of ``threads`` threads each
    embedding full batches at once (summed)."""
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--_limit-worker", str(threads), str(seconds), str(n)],
            env=_child_env(threads),
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(procs)
    ]
    for c in children:
        assert c.stdout is not None
        while c.stdout.readline().strip() != "READY":
            if c.poll() is not None:
                raise RuntimeError("an embedding-limit worker died")
    for c in children:
        assert c.stdin is not None
        c.stdin.write("go\n")
        c.stdin.flush()
    results = []
    for c in children:
        out, _ = c.communicate(timeout=seconds + 120)
        results.append(json.loads(out.strip().splitlines()[-1]))
    return {
        "procs": procs,
        "threads": threads,
        "texts_per_s": sum(r["texts"] / r["seconds"] for r in results),
        "passes_per_s": sum(r["passes"] / r["seconds"] for r in results),
        # what a CPU-second of embedding does, whatever else the machine runs
        "texts_per_cpu_s": sum(r["texts"] for r in results) / sum(r["cpu"] for r in results),
    }


# --- dedupe on replicas -----------------------------------------------------------------


async def _consumers(queue: str) -> int:
    import aio_pika

    conn = await aio_pika.connect(AMQP, timeout=10)
    try:
        channel = await conn.channel()
        q = await channel.declare_queue(queue, passive=True)  # declared by ensure_queue
        count = int(q.declaration_result.consumer_count or 0)
        await channel.close()
        return count
    finally:
        await conn.close()


def _cpu(procs: list[subprocess.Popen[bytes]]) -> float:
    """CPU seconds (user + system) the processes have used so far."""
    import psutil

    total = 0.0
    for p in procs:
        t = psutil.Process(p.pid).cpu_times()
        total += t.user + t.system
    return total


def _spawn(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "airoboros.dedupe"], env=env, cwd=REPO)


async def _run_job(bus: Any, job_id: str, texts: list[str], batch: int, inbox: dict) -> float:
    from airoboros.contracts import Candidate, CandidatesProposed

    messages = [
        CandidatesProposed(
            job_id=job_id,
            task_id=f"{job_id}-{i}",
            instructor="general",
            threshold=THRESHOLD,
            candidates=[Candidate(instruction=t) for t in texts[i : i + batch]],
        )
        for i in range(0, len(texts), batch)
    ]
    done = asyncio.Event()
    inbox[job_id] = (len(messages), done, [])
    start = time.perf_counter()
    await asyncio.gather(*(bus.publish(m) for m in messages))
    await asyncio.wait_for(done.wait(), timeout=1800)
    return time.perf_counter() - start


async def _measure(replicas: int, texts: list[str], args: argparse.Namespace) -> dict:
    import numpy as np

    from airoboros.bus_amqp import AmqpBus
    from airoboros.contracts import CandidatesProposed, CandidatesScreened
    from airoboros.store import SqlStore
    from tests.integration.services_harness import (
        create_database,
        delete_amqp,
        drop_database,
        free_port,
    )

    name, url = create_database()
    prefix = "b" + uuid.uuid4().hex[:10]
    store = SqlStore(url)
    await store.connect()
    warm_job, job_id = uuid.uuid4().hex, uuid.uuid4().hex
    for j in (warm_job, job_id):
        await store.jobs.ensure(j, config={}, targets={"general": len(texts)})
    procs = []
    bus = AmqpBus(AMQP, prefix=prefix, partitions={})
    inbox: dict[str, tuple[int, asyncio.Event, list]] = {}

    async def collect(msg: CandidatesScreened) -> None:
        want, done, got = inbox[msg.job_id]
        got.append(msg)
        if len(got) == want:
            done.set()

    bus.subscribe(CandidatesScreened, collect, concurrency=16, group="generator")
    try:
        await bus.start()
        # The replicas' queue, declared before they start (as they declare it).
        await bus.ensure_queue(CandidatesProposed, group="dedupe")
        for _ in range(replicas):
            env = _child_env(args.threads)
            env.update(
                {
                    "AIROBOROS_DATABASE_URL": url,
                    "AIROBOROS_AMQP_URL": AMQP,
                    "AIROBOROS_AMQP_PREFIX": prefix,
                    "AIROBOROS_DEDUPE_PARTITIONS": "1",
                    "AIROBOROS_EMBEDDING_THREADS": str(args.threads),
                    "AIROBOROS_DEDUPE_CONCURRENCY": str(args.concurrency),
                    "AIROBOROS_EMBEDDING_BATCH_WAIT_MS": str(args.batch_wait_ms),
                    "AIROBOROS_HOST": "127.0.0.1",
                    "AIROBOROS_PORT": str(free_port()),
                    "AIROBOROS_LOG_LEVEL": "WARNING",
                }
            )
            procs.append(_spawn(env))
        queue = bus.queue_names(CandidatesProposed, "dedupe")[0]
        for _ in range(600):
            if await _consumers(queue) == replicas:
                break
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a dedupe replica exited")
            await asyncio.sleep(0.5)
        else:
            raise RuntimeError("the replicas did not all start consuming")
        # Warm-up (first forward passes, connections): small messages, one per replica+.
        await _run_job(bus, warm_job, texts[: 8 * replicas], 4, inbox)
        cpu0 = _cpu(procs)
        elapsed = await _run_job(bus, job_id, texts, args.batch, inbox)
        cpu = _cpu(procs) - cpu0
        verdicts = inbox[job_id][2]
        accepted = sum(len(v.accepted) for v in verdicts)
        judged = sum(len(v.accepted) + v.stats.duplicates for v in verdicts)
        _, _, vecs = await store.vectors.load(job_id)
        sims = vecs @ vecs.T
        np.fill_diagonal(sims, -1.0)
        near_pairs = int((sims >= THRESHOLD).sum() // 2)
        return {
            "replicas": replicas,
            "seconds": elapsed,
            "items_per_s": len(texts) / elapsed,
            "replica_cpu_s": cpu,
            "items_per_cpu_s": len(texts) / cpu,
            "accepted": accepted,
            "judged": judged,
            "stored": len(vecs),
            "near_duplicate_pairs_accepted": near_pairs,
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        await bus.close()
        await store.close()
        drop_database(name)
        await asyncio.to_thread(delete_amqp, prefix, 1)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def replica_figures(
    replicas: list[int] | None = None,
    *,
    n: int = 3000,
    batch: int = 50,
    threads: int = 1,
    batch_wait_ms: float = 10.0,
    concurrency: int = 8,
    limit_procs: int | None = None,
    limit_seconds: float = 10.0,
    repeat: int = 1,
    verbose: bool = True,
) -> dict[str, Any]:
    """Dedupe items/s for one job of ``n`` items on each replica count (separate
    processes of ``threads`` torch threads each), the 2-replica ratio, and each as a
    fraction of the embedding limit measured in the same run (before each round). With
    ``repeat`` > 1 the rounds (limit, then each replica count) are interleaved and the
    medians reported: on a shared machine the load drifts between runs."""
    replicas = replicas or [1, 2, 4]
    args = argparse.Namespace(
        threads=threads, batch=batch, batch_wait_ms=batch_wait_ms, concurrency=concurrency
    )
    cores = os.cpu_count() or 1
    limit_procs = limit_procs or max(1, cores // threads)
    texts = load_texts(n)
    load_before = os.getloadavg()
    limits: list[dict] = []
    singles: list[dict] = []
    runs: list[dict] = []
    for round_ in range(repeat):
        limit = embedding_limit(limit_procs, threads, limit_seconds, n)
        one = limit if limit_procs == 1 else embedding_limit(1, threads, limit_seconds, n)
        limits.append(limit)
        singles.append(one)
        if verbose:
            print(
                f"[round {round_ + 1}] embedding limit: {limit['texts_per_s']:.0f} texts/s, "
                f"{limit['passes_per_s']:.1f} forward passes/s ({limit_procs} procs x "
                f"{threads} threads), {limit['texts_per_cpu_s']:.0f} texts per CPU-s; "
                f"one process: {one['texts_per_s']:.0f} texts/s",
                flush=True,
            )
        for r in replicas:
            fig = asyncio.run(_measure(r, texts, args))
            fig["round"] = round_ + 1
            fig["fraction_of_limit"] = fig["items_per_s"] / limit["texts_per_s"]
            fig["cpu_fraction_of_limit"] = fig["items_per_cpu_s"] / limit["texts_per_cpu_s"]
            runs.append(fig)
            if verbose:
                print(
                    f"[round {round_ + 1}] {r} replica(s): {fig['items_per_s']:.0f} items/s "
                    f"({fig['seconds']:.1f} s), {fig['items_per_cpu_s']:.0f} items per "
                    f"replica CPU-s, accepted {fig['accepted']}/{n}, near-duplicate pairs "
                    f"accepted {fig['near_duplicate_pairs_accepted']}, "
                    f"{fig['fraction_of_limit']:.2f} of the limit "
                    f"({fig['cpu_fraction_of_limit']:.2f} per CPU-s)",
                    flush=True,
                )
    items = {r: _median([f["items_per_s"] for f in runs if f["replicas"] == r]) for r in replicas}
    per_cpu = {
        r: _median([f["items_per_cpu_s"] for f in runs if f["replicas"] == r]) for r in replicas
    }
    limit_texts = _median([x["texts_per_s"] for x in limits])
    limit_cpu = _median([x["texts_per_cpu_s"] for x in limits])
    ratios = [
        a["items_per_s"] / b["items_per_s"]
        for a in runs
        for b in runs
        if a["replicas"] == 2 and b["replicas"] == 1 and a["round"] == b["round"]
    ]
    return {
        "cores": cores,
        "threads_per_replica": threads,
        "n": n,
        "batch": batch,
        "batch_wait_ms": batch_wait_ms,
        "concurrency": concurrency,
        "repeat": repeat,
        "embedding_limit": {
            "procs": limit_procs,
            "threads": threads,
            "texts_per_s": limit_texts,
            "passes_per_s": _median([x["passes_per_s"] for x in limits]),
            "texts_per_cpu_s": limit_cpu,
        },
        "embedding_limit_one_process": {
            "texts_per_s": _median([x["texts_per_s"] for x in singles])
        },
        "limits": limits,
        "runs": runs,
        "items_per_s": items,
        "items_per_cpu_s": per_cpu,
        # the median of the per-round ratios (each round's 1 and 2 ran minutes apart)
        "ratio_2": _median(ratios) if ratios else None,
        "best_fraction_of_limit": max(items.values()) / limit_texts,
        "cpu_fraction_of_limit": {r: v / limit_cpu for r, v in per_cpu.items()},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_limit-worker":
        _limit_worker(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", default="1,2,4")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--limit-procs", type=int, default=None)
    p.add_argument("--limit-seconds", type=float, default=10.0)
    p.add_argument("--repeat", type=int, default=1, help="interleaved rounds (medians)")
    a = p.parse_args()
    figs = replica_figures(
        [int(x) for x in a.replicas.split(",")],
        n=a.n,
        batch=a.batch,
        threads=a.threads,
        batch_wait_ms=a.batch_wait_ms,
        concurrency=a.concurrency,
        limit_procs=a.limit_procs,
        limit_seconds=a.limit_seconds,
        repeat=a.repeat,
    )
    print(
        f"machine: {figs['cores']} cores, shared with other work; load average before "
        f"{figs['loadavg_before'][0]:.2f}, after {figs['loadavg_after'][0]:.2f}; "
        f"{figs['threads_per_replica']} torch thread(s) per replica"
    )
    ratio = figs["ratio_2"]
    print(
        "dedupe-replicas: "
        + ", ".join(f"{r}: {v:.0f} items/s" for r, v in figs["items_per_s"].items())
        + (f"; 2 replicas = {ratio:.2f}x (target 1.7x)" if ratio is not None else "")
        + f"; best = {figs['best_fraction_of_limit']:.2f} of the embedding limit "
        f"{figs['embedding_limit']['texts_per_s']:.0f} texts/s (target 0.8); per CPU-second: "
        + ", ".join(f"{r}: {v:.2f}" for r, v in figs["cpu_fraction_of_limit"].items())
        + " of the limit's texts per CPU-second"
    )


if __name__ == "__main__":
    main()
