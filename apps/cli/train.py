"""``airoboros train-experts``: a dataset in, an LMoE package of LoRA experts out.

    airoboros train-experts --dataset instructions.jsonl --base-model ./llama \\
        --output ./lmoe [--experts qa,code] [--train-config train.yaml] \\
        [--experts-config experts.yaml] [--max-steps N] [--epochs E] \\
        [--database-url URL] [--object-store-url URL]

Segments the dataset, trains the chosen experts one at a time (a rerun after a kill
resumes each from its last checkpoint), writes ``adapters/<expert>/`` and
``routing_data/expert_<expert>.jsonl`` under ``--output``, records every expert in the
adapter registry (``--database-url``, default a SQLite file in ``--output``) and, with
``--object-store-url``, uploads the package. Exit codes: 0 every expert trained; 1 some
failed (each named); 2 bad input (one line).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import yaml

from airoboros.errors import ConfigError


def add_train_parser(sub: Any) -> None:
    tr = sub.add_parser(
        "train-experts",
        help="train one LoRA expert per task family (an LMoE package)",
        description="Segment a dataset into experts and train a LoRA adapter for each "
        "(docs/trainer.md).",
    )
    tr.add_argument("--dataset", nargs="+", required=True, metavar="JSONL", help="dataset files")
    tr.add_argument("--base-model", required=True, help="local path of the base model")
    tr.add_argument("--output", required=True, help="package folder to write")
    tr.add_argument("--experts", default=None, help="comma-separated experts (default: all)")
    tr.add_argument("--train-config", default=None, help="YAML of training settings")
    tr.add_argument("--experts-config", default=None, help="YAML category -> expert map")
    tr.add_argument("--max-steps", type=int, default=None, help="stop each expert after N steps")
    tr.add_argument("--epochs", type=float, default=None, help="epochs per expert")
    tr.add_argument("--database-url", default=None, help="adapter registry (default: SQLite)")
    tr.add_argument("--object-store-url", default=None, help="upload the package here")
    tr.add_argument("--debug", action="store_true", help="tracebacks on errors")
    tr.set_defaults(func=cmd_train_experts)


def _train_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    if args.train_config:
        path = Path(args.train_config)
        if not path.is_file():
            raise ConfigError([f"--train-config: {path} does not exist"])
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"--train-config: {path} is not a mapping of settings"])
        cfg.update(loaded)
    if args.max_steps is not None:
        cfg["max_steps"] = args.max_steps
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    return cfg


def cmd_train_experts(args: argparse.Namespace) -> int:
    from airoboros.store import make_store
    from airoboros.trainer.pipeline import train_experts
    from airoboros.trainer.segment import SegmentError, read_rows

    try:
        rows = read_rows([Path(p) for p in args.dataset])
    except SegmentError as exc:
        raise ConfigError([str(exc)]) from None
    output = Path(args.output)
    experts = [e.strip() for e in args.experts.split(",") if e.strip()] if args.experts else None
    train_config = _train_config(args)
    try:
        from airoboros.trainer.train import TrainConfig

        TrainConfig.from_dict(train_config)
    except (ValueError, TypeError) as exc:
        raise ConfigError([f"training settings: {exc}"]) from None

    async def go() -> list[Any]:
        output.mkdir(parents=True, exist_ok=True)
        store = make_store(
            args.database_url or f"sqlite:///{(output / 'registry.sqlite').resolve()}"
        )
        await store.connect()
        objects = None
        if args.object_store_url:
            from airoboros.objects_s3 import make_object_store

            objects = make_object_store(args.object_store_url)
        try:
            return await train_experts(
                rows,
                base_model=args.base_model,
                output=output,
                experts=experts,
                train_config=train_config,
                expert_map_path=Path(args.experts_config) if args.experts_config else None,
                registry=store.registry,
                objects=objects,
                dataset_uri=",".join(str(Path(p).resolve()) for p in args.dataset),
            )
        finally:
            await store.close()

    outcomes = asyncio.run(go())
    for o in outcomes:
        if o.status == "published":
            loss = o.metrics.get("train_loss")
            extra = f", train loss {loss:.4f}" if isinstance(loss, float) else ""
            print(f"  {o.expert:<12} published: {o.uri}{extra}", file=sys.stderr)
        else:
            print(f"  {o.expert:<12} FAILED: {o.error}", file=sys.stderr)
    failed = [o.expert for o in outcomes if o.status != "published"]
    if failed:
        print(f"airoboros: training failed for {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"{len(outcomes)} experts in {output}", file=sys.stderr)
    return 0
