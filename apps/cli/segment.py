"""``airoboros segment-experts``: split a dataset into one training set per expert.

    airoboros segment-experts --input a.jsonl [b.jsonl ...] --output DIR
        [--experts-config experts.yaml] [--seed N] [--max-routing-samples N]
        [--split-above N [--split-k-max K]]

With ``--split-above N`` an expert of more than N rows is clustered into sub-experts
(docs/trainer.md, "Automatic expert splitting"); ``DIR/dataset.jsonl`` and
``DIR/experts.yaml`` then hold the relabelled rows and the map ``train-experts`` takes.

Exit codes follow the CLI's: 0 done; 2 a missing or malformed input (one line naming the
file and line), an empty dataset or a bad experts config; 1 the output could not be
written. Warnings (unmapped categories, experts without rows) go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_segment_parser(sub: Any) -> None:
    """Register the ``segment-experts`` command on the CLI's subparsers."""
    sp = sub.add_parser(
        "segment-experts",
        help="split a dataset into one training set per expert",
        description="Split a dataset into per-expert training and routing data, with "
        "cross-sampling between experts (docs/trainer.md, Segmentation).",
    )
    sp.add_argument(
        "--input", "-i", nargs="+", required=True, metavar="JSONL", help="dataset files"
    )
    sp.add_argument("--output", "-o", required=True, metavar="DIR", help="output folder")
    sp.add_argument(
        "--experts-config",
        default=None,
        metavar="YAML",
        help="category -> expert map (default: the six built-in experts)",
    )
    sp.add_argument("--seed", type=int, default=None, help="sampling seed (default: the map's)")
    sp.add_argument(
        "--max-routing-samples",
        type=int,
        default=None,
        metavar="N",
        help="keep at most N routing samples per expert",
    )
    sp.add_argument(
        "--split-above",
        type=int,
        default=None,
        metavar="N",
        help="cluster every expert of more than N rows into sub-experts",
    )
    sp.add_argument(
        "--split-k-max",
        type=int,
        default=None,
        metavar="K",
        help="most sub-experts per split expert (default 6)",
    )
    sp.add_argument(
        "--embedding-model",
        default=None,
        help="embedder for --split-above (default all-MiniLM-L6-v2)",
    )
    sp.add_argument("--debug", action="store_true", help="tracebacks on errors")
    sp.set_defaults(func=cmd_segment_experts)


def cmd_segment_experts(args: argparse.Namespace) -> int:
    from airoboros.cli.codes import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
    from airoboros.errors import ConfigError
    from airoboros.trainer.segment import (
        SPLIT_K_MAX,
        SegmentError,
        load_expert_map,
        read_rows,
        segment,
        split_experts,
        summary_table,
        write_segmentation,
        write_split,
    )

    def fail(message: str, code: int) -> int:
        print(f"airoboros: {message}", file=sys.stderr)
        return code

    if args.max_routing_samples is not None and args.max_routing_samples < 1:
        return fail("--max-routing-samples: must be at least 1", EXIT_CONFIG)
    if args.split_above is not None and args.split_above < 1:
        return fail("--split-above: must be at least 1", EXIT_CONFIG)
    k_max = args.split_k_max if args.split_k_max is not None else SPLIT_K_MAX
    if k_max < 2:
        return fail("--split-k-max: must be at least 2", EXIT_CONFIG)
    split = None
    try:
        expert_map = load_expert_map(args.experts_config)
        rows = read_rows(args.input)
        if args.split_above is not None:
            from airoboros.embeddings import SentenceTransformerEmbedder

            try:
                embedder = SentenceTransformerEmbedder(args.embedding_model)
                import faiss  # noqa: F401  (split_experts' k-means)
            except ImportError as exc:
                return fail(
                    f"--split-above needs the embedder and faiss ({exc.name}): "
                    "pip install 'airoboros[router]'",
                    EXIT_CONFIG,
                )
            split = split_experts(
                rows,
                expert_map,
                above=args.split_above,
                embed=embedder.embed,
                seed=args.seed if args.seed is not None else expert_map.sampling.seed,
                k_max=k_max,
            )
            rows, expert_map = split.rows, split.expert_map
        seg = segment(
            rows, expert_map, seed=args.seed, max_routing_samples=args.max_routing_samples
        )
    except (SegmentError, ConfigError) as exc:
        if args.debug:
            raise
        return fail(str(exc), EXIT_CONFIG)
    try:
        summary = write_segmentation(seg, args.output)
        if split is not None:
            write_split(split, args.output)
    except OSError as exc:
        if args.debug:
            raise
        return fail(f"could not write {args.output}: {exc}", EXIT_FAILED)
    for w in seg.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if split is not None:
        for sp in split.splits:
            parts = ", ".join(f"{p.name} {len(p.rows)}" for p in sp.parts)
            print(f"{sp.expert} ({sp.rows} rows): {sp.reason}" + (f": {parts}" if parts else ""))
    print("\n".join(summary_table(seg)))
    print(f"wrote {args.output} (summary: {summary})")
    return EXIT_OK
