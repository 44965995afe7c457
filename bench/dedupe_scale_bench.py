"""Dedupe at scale: the flat and the approximate index from 10k to 1M vectors, and one
job's dedupe on 1, 2 and 4 replicas.

INDEX part, at each --sizes N: the index holds the real alpaca_5000 embeddings
(all-MiniLM-L6-v2, 4000 of them; the other 1000 are queries) plus N - 4000 synthetic unit
vectors in clusters (384 dimensions, 50 per cluster on average). The queries, in batches of
50 as dedupe searches them: the 1000 held-out alpaca rows, near-duplicates of stored rows
(cosine 0.8 to 1.0, spread across the thresholds) and fresh rows of the same clusters.
For each index (``FaissVectorStore`` flat; approximate: IVF over 8-bit codes with the
exact re-check; and "auto", what dedupe runs with --approx-above) it prints the build time,
the memory it holds, search p50/p99 per batch of 50 (the store's ``search(k=1)``, re-check
included), and the agreement of the approximate verdicts (top score >= threshold) with the
exact index at the instructors' default thresholds (min_docsearch_score 0.35, the top-level
default, and those of example-config.yaml, as cosines). A short HNSW comparison
(IndexHNSWFlat, inner product) runs at the sizes up to --hnsw-max.

REPLICAS part: ``replica_figures(replicas=...)`` of bench/dedupe_replicas.py when that
module exists (--replicas "" skips it).

faiss runs on --threads OpenMP threads (faiss.omp_set_num_threads), torch on as many.
Timings are wall-clock on a possibly shared machine (the load average is printed). Ends
with one line:

  dedupe-scale: p50 1M/10k = X (target 2x), agreement = Y (target 0.999), 2 replicas = Zx (target 1.7x)

X is the p50 of the "auto" store (what dedupe searches) at the largest size over the
smallest; Y the lowest agreement over the sizes.

    .venv/bin/python bench/dedupe_scale_bench.py [--sizes 10000,100000,1000000]
        [--replicas 1,2,4] [--threads 2] [--batches 20] [--approx-above 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "alpaca_5000.json"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "airoboros"
DIM = 384
BATCH = 50
#: min_docsearch_score of the top level (0.35) and of example-config.yaml's instructors
DEFAULT_SCORES = (0.35, 0.25, 0.15, 0.1, 0.07, 0.05, 0.04, 0.03, 0.01)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--replicas", default="1,2,4", help='comma-separated; "" skips them')
    p.add_argument("--threads", type=int, default=2, help="faiss OpenMP and torch threads")
    p.add_argument("--batches", type=int, default=20, help="timed batches of 50 per index")
    p.add_argument("--approx-above", type=int, default=None, help="default: the product's")
    p.add_argument("--hnsw-max", type=int, default=100_000, help="largest size HNSW runs at")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = p.parse_args(argv)
    args.sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    args.replicas = [int(s) for s in args.replicas.split(",") if s.strip()]
    if not args.sizes or min(args.sizes) <= 5000 or args.batches < 1 or args.threads < 1:
        p.error("--sizes must be above 5000; --batches and --threads >= 1")
    return args


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def alpaca_vectors(path: Path) -> np.ndarray:
    """alpaca_5000 embedded by the real all-MiniLM-L6-v2 (cached after the first run)."""
    from airoboros.embeddings import SentenceTransformerEmbedder

    cache = CACHE / f"alpaca5000-minilm-{path.stat().st_size}.npy"
    if cache.exists():
        return np.load(cache)
    rows = json.loads(path.read_text(encoding="utf-8"))
    texts = [r["instruction"] + ("\n" + r["input"] if r.get("input") else "") for r in rows]
    t0 = time.perf_counter()
    vecs = SentenceTransformerEmbedder(None, "cpu", dtype="float32").embed(texts)
    print(f"embedded {len(texts)} alpaca rows in {time.perf_counter() - t0:.1f} s")
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(cache, vecs)
    return np.asarray(vecs, dtype=np.float32)


def dataset(size: int, real: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(stored [size, DIM], queries [m, DIM]) as the module docstring says."""
    stored_real, query_real = real[:4000], real[4000:]
    n = size - len(stored_real)
    centers = unit(rng.standard_normal((max(1, n // 50), DIM), dtype=np.float32))
    synth = np.empty((n, DIM), dtype=np.float32)
    step = 100_000
    for s in range(0, n, step):
        m = min(step, n - s)
        noise = rng.standard_normal((m, DIM), dtype=np.float32) * 0.06
        synth[s : s + m] = unit(centers[rng.integers(0, len(centers), m)] + noise)
    stored = np.vstack([stored_real, synth])
    # Near-duplicates of stored rows at cosine ~0.8..1.0 (unit noise of norm r: cos ~ 1/sqrt(1+r^2)).
    k = 1000
    src = stored[rng.integers(0, size, k)]
    r = rng.uniform(0.0, 0.75, (k, 1)).astype(np.float32)
    noise = unit(rng.standard_normal((k, DIM), dtype=np.float32)) * r
    near = unit(src + noise)
    fresh = unit(
        centers[rng.integers(0, len(centers), 500)]
        + rng.standard_normal((500, DIM), dtype=np.float32) * 0.06
    )
    queries = np.vstack([query_real, near, fresh])
    return stored, queries[rng.permutation(len(queries))]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def measure(
    store: Any, stored: np.ndarray, queries: np.ndarray, batches: int
) -> dict[str, Any]:
    ids = [str(i) for i in range(len(stored))]
    m0, t0 = rss_mb(), time.perf_counter()
    await store.add("bench", ids, stored)
    build = time.perf_counter() - t0
    mem = rss_mb() - m0
    times = []
    nb = len(queries) // BATCH
    for b in range(min(batches, nb)):
        q = queries[b * BATCH : (b + 1) * BATCH]
        t = time.perf_counter()
        await store.search("bench", q, k=1)
        times.append(time.perf_counter() - t)
    best = np.concatenate(
        [
            (await store.search("bench", queries[s : s + 500], k=1))[0][:, 0]
            for s in range(0, len(queries), 500)
        ]
    )
    return {
        "build_s": build,
        "mem_mb": mem,
        "p50_ms": float(np.median(times)) * 1e3,
        "p99_ms": float(np.quantile(times, 0.99)) * 1e3,
        "best": best,
        "approx": store.is_approximate("bench"),
    }


def hnsw_figures(stored: np.ndarray, queries: np.ndarray, batches: int) -> dict[str, Any]:
    import faiss

    t0 = time.perf_counter()
    index = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 40
    index.add(stored)
    build = time.perf_counter() - t0
    index.hnsw.efSearch = 64
    times = []
    for b in range(min(batches, len(queries) // BATCH)):
        t = time.perf_counter()
        index.search(queries[b * BATCH : (b + 1) * BATCH], 16)
        times.append(time.perf_counter() - t)
    scores, _ = index.search(queries, 16)
    return {
        "build_s": build,
        "p50_ms": float(np.median(times)) * 1e3,
        "p99_ms": float(np.quantile(times, 0.99)) * 1e3,
        "best": scores[:, 0],
    }


def agreement(exact: np.ndarray, approx: np.ndarray) -> float:
    from airoboros.embeddings import l2_threshold_to_cosine

    thresholds = [l2_threshold_to_cosine(s) for s in DEFAULT_SCORES]
    return float(np.mean([np.mean((exact >= t) == (approx >= t)) for t in thresholds]))


def index_part(args: argparse.Namespace) -> tuple[dict[int, dict[str, Any]], float]:
    import faiss

    from airoboros.vectors import DEFAULT_APPROX_ABOVE, FaissVectorStore

    faiss.omp_set_num_threads(args.threads)
    approx_above = args.approx_above or DEFAULT_APPROX_ABOVE
    print(
        f"faiss {faiss.__version__}, omp threads {args.threads}; auto switches above {approx_above}"
    )
    real = alpaca_vectors(args.data)
    rng = np.random.default_rng(0)
    results: dict[int, dict[str, Any]] = {}
    worst = 1.0
    for size in args.sizes:
        stored, queries = dataset(size, real, rng)
        row: dict[str, Any] = {}
        for name, above in (("flat", size + 1), ("approx", 1)):
            # One store alive at a time (1M x 384 float32 is 1.5 GB).
            store = FaissVectorStore(DIM, approx_above=above)
            row[name] = asyncio.run(measure(store, stored, queries, args.batches))
            del store
        # "auto" (what dedupe runs) is one of the two at a given size.
        row["auto"] = dict(row["approx" if size > approx_above else "flat"])
        exact = row["flat"]["best"]
        for name in ("approx", "auto"):
            row[name]["agreement"] = agreement(exact, row[name]["best"])
            row[name]["exact_top1"] = float(np.mean(np.abs(row[name]["best"] - exact) < 1e-5))
        if size <= args.hnsw_max:
            row["hnsw"] = hnsw_figures(stored, queries, args.batches)
            row["hnsw"]["agreement"] = agreement(exact, row["hnsw"]["best"])
        worst = min(worst, row["approx"]["agreement"], row["auto"]["agreement"])
        for name, r in row.items():
            extra = ""
            if "agreement" in r:
                extra = f"  agreement {r['agreement']:.5f}"
            if "exact_top1" in r:
                extra += f"  same top-1 {r['exact_top1']:.4f}"
            mem = f"  mem +{r['mem_mb']:.0f} MB" if "mem_mb" in r else ""
            kind = "" if "approx" not in r else (" [approximate]" if r["approx"] else " [flat]")
            print(
                f"{size:>9} {name:<6}{kind:<14} build {r['build_s']:7.2f} s{mem}"
                f"  p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms{extra}",
                flush=True,
            )
        results[size] = row
        del stored, queries
    return results, worst


def replicas_part(replicas: list[int]) -> dict[str, Any] | None:
    path = HERE / "dedupe_replicas.py"
    if not replicas or not path.exists():
        print("replicas: skipped" + ("" if replicas else ' (--replicas "")'))
        return None
    spec = importlib.util.spec_from_file_location("dedupe_replicas", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    figures: dict[str, Any] = module.replica_figures(replicas=replicas)
    print("replicas:", {k: v for k, v in figures.items() if not isinstance(v, (list, dict))})
    return figures


def ratio_2(figures: dict[str, Any] | None) -> str:
    if not figures:
        return "n/a"
    for key in ("ratio_2", "ratio2", "speedup_2"):
        if key in figures:
            return f"{float(figures[key]):.2f}x"
    rates = figures.get("items_per_s") or {}
    one, two = rates.get(1) or rates.get("1"), rates.get(2) or rates.get("2")
    return f"{two / one:.2f}x" if one and two else "n/a "


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    print(f"load average before: {os.getloadavg()}")
    results, worst = index_part(args)
    small, large = results[args.sizes[0]], results[args.sizes[-1]]
    ratio = large["auto"]["p50_ms"] / small["auto"]["p50_ms"]
    print(
        f"p50 {args.sizes[-1]}/{args.sizes[0]}: auto {ratio:.2f}x, approximate "
        f"{large['approx']['p50_ms'] / small['approx']['p50_ms']:.2f}x, flat "
        f"{large['flat']['p50_ms'] / small['flat']['p50_ms']:.2f}x"
    )
    figures = replicas_part(args.replicas)
    print(f"load average after: {os.getloadavg()}")
    print(
        f"dedupe-scale: p50 1M/10k = {ratio:.2f}x (target 2x), agreement = {worst:.4f} "
        f"(target 0.999), 2 replicas = {ratio_2(figures)} (target 1.7x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
