"""Dedupe throughput: ours (batched Deduper.screen) against the two older ways.

Three ways to dedupe the same stream of alpaca items, fed in arrival order:

  ours      Deduper.screen over batches of --batch items, cosine >= the original's
            default min_docsearch_score (0.35) converted with l2_threshold_to_cosine; the
            embedder at --dtype (default auto, as the product runs it).
  (a) rouge the self-instruct way: ROUGE-L F-measure >= 0.7 against every kept text,
            one item at a time, with self-instruct's own ``scorer.score`` per pair. O(n^2),
            so it runs on the first --rouge-n items only, and ours is rerun on that same
            prefix (fresh index) for the comparison. (a') is Stanford Alpaca's faster
            variant (each text tokenized once), printed for reference only.
  (b) orig  the original airoboros way: embed one item alone as its embeddings.py did
            (tokenize, split into 512-token chunks, decode, ``model.encode`` each chunk
            with normalize_embeddings, length-weighted mean) on the same model in float32,
            search a faiss IndexFlatL2 with k=1, reject if the squared L2 distance <= 0.35,
            else add it. All N items.

All methods see the same dedupe text (instruction, plus "\\n" + input when non-empty).
Prints items, wall seconds, items/s, rejections and CPU seconds per method, the speed
ratios, and how much the rejected sets overlap. Timings are wall-clock on a possibly
shared machine: the load average is printed before and after. Reports only; exits 0.

    .venv/bin/python bench/dedupe_bench.py [--n 5000] [--rouge-n 5000] [--batch 50]
                                           [--threads 2] [--embed-batch B] [--dtype auto]
                                           [--data PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca_5000.json"
MIN_DOCSEARCH_SCORE = 0.35  # the original's default (squared L2 between unit vectors)
ROUGE_THRESHOLD = 0.7  # self-instruct's cut-off on ROUGE-L F-measure


@dataclass
class Result:
    name: str
    items: int
    seconds: float
    cpu_seconds: float
    rejected: set[int] = field(default_factory=set)

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("inf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # The whole file by default: ROUGE's cost grows with the square of N, so a prefix
    # flatters it (about 12 minutes of ROUGE on 2 cores for all 5000).
    p.add_argument("--n", type=int, default=5000, help="items for ours and (b) (default 5000)")
    p.add_argument(
        "--rouge-n", type=int, default=5000, help="prefix for (a) and its ours (default 5000)"
    )
    p.add_argument("--batch", type=int, default=50, help="Deduper.screen batch (default 50)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--embed-batch",
        type=int,
        default=None,
        help="SentenceTransformerEmbedder batch_size (default: the library's)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="precision of ours (default auto); (b) always runs float32 like the original",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"default {DEFAULT_DATA}")
    args = p.parse_args(argv)
    if args.n < 1 or args.rouge_n < 1 or args.batch < 1 or args.threads < 1:
        p.error("--n, --rouge-n, --batch and --threads must be >= 1")
    args.rouge_n = min(args.rouge_n, args.n)
    return args


def load_texts(path: Path, n: int) -> list[str]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    texts = []
    for row in rows[:n]:
        text = row["instruction"]
        if row.get("input"):
            text += "\n" + row["input"]
        texts.append(text)
    if len(texts) < n:
        print(f"note: {path} has only {len(texts)} items; using them all")
    return texts


def run_ours(embedder: Any, texts: list[str], batch: int, threshold: float) -> Result:
    from airoboros.dedupe.service import Deduper
    from airoboros.vectors import FaissVectorStore

    async def go() -> Result:
        deduper = Deduper(embedder, FaissVectorStore(embedder.dim))
        rejected: set[int] = set()
        t0, c0 = time.perf_counter(), time.process_time()
        for start in range(0, len(texts), batch):
            chunk = texts[start : start + batch]
            ids = [str(i) for i in range(start, start + len(chunk))]
            flags = await deduper.screen("bench", ids, chunk, threshold)
            rejected.update(start + j for j, ok in enumerate(flags) if not ok)
        return Result(
            "ours", len(texts), time.perf_counter() - t0, time.process_time() - c0, rejected
        )

    return asyncio.run(go())


def run_rouge(texts: list[str], pretokenized: bool = False) -> Result:
    """Self-instruct's filter, one item at a time: ROUGE-L F against every kept text.

    The default is self-instruct's own call, ``scorer.score(new, kept)`` per pair (its
    per-item ``Pool(4)`` left out, which only adds process start-up). ``pretokenized``
    is Stanford Alpaca's later variant: tokenize each text once, then ``_score_lcs``.
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept: list[str] = []
    kept_tokens: list[list[str]] = []
    rejected: set[int] = set()
    t0, c0 = time.perf_counter(), time.process_time()
    for i, text in enumerate(texts):
        tokens = scorer._tokenizer.tokenize(text) if pretokenized else []
        if pretokenized:
            scores = [rouge_scorer._score_lcs(tokens, k).fmeasure for k in kept_tokens]
        else:
            scores = [scorer.score(text, k)["rougeL"].fmeasure for k in kept]
        if scores and max(scores) >= ROUGE_THRESHOLD:
            rejected.add(i)
        else:
            kept.append(text)
            kept_tokens.append(tokens)
    name = "(a') rouge, pre-tokenized" if pretokenized else "(a) rouge"
    return Result(name, len(texts), time.perf_counter() - t0, time.process_time() - c0, rejected)


def original_embed(model: Any, text: str) -> Any:
    """The original's embeddings.py, rewritten: chunks of 512 tokens, decoded, each
    encoded alone and normalised, then averaged weighted by character length."""
    import numpy as np

    tokenizer = model.tokenizer
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    chunks = [tokenizer.decode(ids[i : i + 512]) for i in range(0, len(ids), 512)] or [text]
    vecs = np.stack([model.encode(chunk, normalize_embeddings=True) for chunk in chunks])
    mean = np.average(vecs, axis=0, weights=[len(c) for c in chunks])
    return (mean / np.linalg.norm(mean)).astype(np.float32).reshape(1, -1)


def run_original(model: Any, texts: list[str]) -> Result:
    import faiss

    index = faiss.IndexFlatL2(model.get_sentence_embedding_dimension())
    rejected: set[int] = set()
    t0, c0 = time.perf_counter(), time.process_time()
    for i, text in enumerate(texts):
        vec = original_embed(model, text)
        if index.ntotal > 0:
            dist, _ = index.search(vec, 1)
            if dist[0, 0] <= MIN_DOCSEARCH_SCORE:
                rejected.add(i)
                continue
        index.add(vec)
    return Result(
        "(b) original", len(texts), time.perf_counter() - t0, time.process_time() - c0, rejected
    )


def overlap(a: set[int], b: set[int]) -> tuple[int, float]:
    union = a | b
    return len(a & b), (len(a & b) / len(union) if union else 1.0)


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def show(label: str, r: Result) -> None:
    print(
        f"  {label:<30} items={r.items:>5}  seconds={r.seconds:8.2f}  "
        f"items/s={r.rate:9.1f}  rejected={len(r.rejected):>4}  cpu-seconds={r.cpu_seconds:7.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Thread counts must be fixed before torch (and its OpenMP runtime) is imported.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from airoboros.embeddings import (
        SentenceTransformerEmbedder,
        l2_threshold_to_cosine,
        resolve_model_name,
    )

    torch.set_num_threads(args.threads)
    texts = load_texts(args.data, args.n)
    n, rn = len(texts), min(args.rouge_n, len(texts))
    threshold = l2_threshold_to_cosine(MIN_DOCSEARCH_SCORE)

    kwargs = {} if args.embed_batch is None else {"batch_size": args.embed_batch}
    embedder = SentenceTransformerEmbedder(device="cpu", dtype=args.dtype, **kwargs)
    from sentence_transformers import SentenceTransformer

    original_model = SentenceTransformer(resolve_model_name(None), device="cpu")
    # Warm up once (weights paged in, kernels chosen) on a single text and a full batch.
    embedder.embed(["warm up the model"])
    embedder.embed(["warm up the model", "once before timing", "anything at all"] * 4)
    original_embed(original_model, "warm up the model")

    async def worker_threads() -> int:  # Deduper embeds in a worker thread
        return await asyncio.to_thread(torch.get_num_threads)

    print("dedupe bench")
    print(f"  data: {args.data} ({n} items; ROUGE prefix {rn})")
    print(
        f"  torch threads: {torch.get_num_threads()} (main), "
        f"{asyncio.run(worker_threads())} (worker thread); --threads {args.threads}, "
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, cpus={os.cpu_count()}"
    )
    print(
        f"  ours: batch {args.batch}, cos >= {threshold:.3f} "
        f"(= l2_threshold_to_cosine({MIN_DOCSEARCH_SCORE})), "
        f"embedder batch_size {embedder._batch_size}, {embedder.dtype}"
    )
    print(
        f"  (a): ROUGE-L F >= {ROUGE_THRESHOLD}; (b): IndexFlatL2 k=1, squared L2 <= "
        f"{MIN_DOCSEARCH_SCORE}"
    )
    print(f"  load average before: {load_average()}")
    sys.stdout.flush()

    ours_prefix = run_ours(embedder, texts[:rn], args.batch, threshold)
    rouge = run_rouge(texts[:rn])
    rouge_tok = run_rouge(texts[:rn], pretokenized=True)
    ours_all = run_ours(embedder, texts, args.batch, threshold)
    orig = run_original(original_model, texts)
    print(f"  load average after:  {load_average()}")

    print(f"\nprefix: first {rn} items")
    show(f"ours (N={rn})", ours_prefix)
    show(f"(a) rouge-L (N={rn})", rouge)
    show(f"(a') rouge-L pre-tok (N={rn})", rouge_tok)
    print(f"all: {n} items")
    show(f"ours (N={n})", ours_all)
    show(f"(b) original (N={n})", orig)

    vs_rouge = ours_prefix.rate / rouge.rate
    vs_orig = ours_all.rate / orig.rate
    print("\nspeed (items/s ratio)")
    print(f"  ours/(a) on N={rn}: {vs_rouge:6.1f}x  (target >= 20x)")
    print(f"  ours/(a') on N={rn}: {ours_prefix.rate / rouge_tok.rate:6.1f}x  (for reference)")
    print(f"  ours/(b) on N={n}: {vs_orig:6.1f}x  (target >= 3x)")

    print("\nrejection overlap")
    both, jac = overlap(ours_prefix.rejected, rouge.rejected)
    print(
        f"  ours vs (a), N={rn}: |ours|={len(ours_prefix.rejected)} "
        f"|a|={len(rouge.rejected)} |ours ∩ a|={both} Jaccard={jac:.3f}"
    )
    if rouge_tok.rejected != rouge.rejected:
        print("  note: (a') rejected a different set from (a)")
    both, jac = overlap(ours_all.rejected, orig.rejected)
    print(
        f"  ours vs (b), N={n}: |ours|={len(ours_all.rejected)} "
        f"|b|={len(orig.rejected)} |ours ∩ b|={both} Jaccard={jac:.3f}"
    )

    print(
        f"\ndedupe: ours/rouge = {vs_rouge:.1f}x (target 20x), "
        f"ours/original = {vs_orig:.1f}x (target 3x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
