"""``airoboros segment-experts``: split a dataset into one training set per expert.

    airoboros segment-experts --input a.jsonl [b.jsonl ...] --output DIR
        [--experts-config experts.yaml] [--seed N] [--max-routing-samples N]

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
    sp.add_argument("--debug", action="store_true", help="tracebacks on errors")
    sp.set_defaults(func=cmd_segment_experts)


def cmd_segment_experts(args: argparse.Namespace) -> int:
    from airoboros.cli.codes import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
    from airoboros.trainer.segment import (
        SegmentError,
        load_expert_map,
        read_rows,
        segment,
        summary_table,
        write_segmentation,
    )

    def fail(message: str, code: int) -> int:
        print(f"airoboros: {message}", file=sys.stderr)
        return code

    if args.max_routing_samples is not None and args.max_routing_samples < 1:
        return fail("--max-routing-samples: must be at least 1", EXIT_CONFIG)
    try:
        expert_map = load_expert_map(args.experts_config)
        rows = read_rows(args.input)
        seg = segment(
            rows, expert_map, seed=args.seed, max_routing_samples=args.max_routing_samples
        )
    except SegmentError as exc:
        if args.debug:
            raise
        return fail(str(exc), EXIT_CONFIG)
    try:
        summary = write_segmentation(seg, args.output)
    except OSError as exc:
        if args.debug:
            raise
        return fail(f"could not write {args.output}: {exc}", EXIT_FAILED)
    for w in seg.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print("\n".join(summary_table(seg)))
    print(f"wrote {args.output} (summary: {summary})")
    return EXIT_OK
