"""Experts: does an ensemble of per-category LoRA experts beat one LoRA of the same size?

The seed's experiment, on the real model (SmolLM2-135M-Instruct, see docs/trainer.md):

  data     ../shared/data/alpaca_5000.json (or an airoboros JSONL via --input, whose
           ``category`` is the expert). Alpaca rows are mapped to experts by a keyword rule
           on the instruction, first match wins (RULES below):
             code     code/program/function/python/javascript/java/sql/algorithm/html/...
             math     calculate/compute/number/equation/sum/solve/math/percent/average/...
                      or an arithmetic expression such as "12 * 7"
             writing  write/story/poem/essay/compose/letter/paragraph/slogan/tweet/haiku/...
             qa       everything else
           Per expert, seeded: --rows-per-expert training rows and --held-out held-out rows.
  (a)      one LoRA per expert, rank --lora-r, trained by the project's trainer
           (airoboros.trainer.train.train_expert, the code train-experts runs) on the
           expert's training set from airoboros.trainer.segment.segment (own rows plus
           cross-sampled rows of the other experts, as train-experts does).
  (b)      one LoRA of rank --lora-r x (number of experts) -- the same number of LoRA
           parameters as (a) together -- on the concatenation of (a)'s training sets, for
           the same --epochs: the same rows, so the same training tokens (printed; its
           packing across experts fills its batches better, so it takes a few fewer steps).
  routing  the project's router (airoboros.router.routing.Router, default rule) loads the
           routing samples segment() wrote and routes each held-out row
           ("A chat. " + instruction, as the routing samples are written).

Reported, per expert and overall: mean loss per response token on the held-out rows for the
base model, (a) routed by the router, (a) with the right (oracle) expert, and (b); plus the
routing accuracy. With --split-above N, every expert of more than N training rows is split by
``airoboros.trainer.segment.split_experts`` (what ``segment-experts --split-above`` does),
the sub-experts are trained the same way and the split experts' held-out rows are routed
among the sub-experts: their loss is compared with the unsplit expert's.

    .venv/bin/python bench/experts_bench.py [--model DIR] [--device cpu|cuda] [--threads 2]
        [--input airoboros.jsonl] [--rows-per-expert 40] [--held-out 30] [--max-seq-len 256]
        [--lora-r 8] [--lr 5e-4] [--batch 4] [--split-above N] [--workdir DIR]

Reports only; exits 0 (2 when the model is missing). A rerun with the same --workdir reuses
every adapter whose rows and training config are unchanged. The ``--device cuda`` path has not been
run (no GPU was lent when this was written).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_5000.json"
DEFAULT_MODEL = str(REPO / "build" / "models" / "SmolLM2-135M-Instruct")  # make model

#: The stated rule: the first expert whose pattern matches the instruction; else "qa".
RULES: tuple[tuple[str, str], ...] = (
    (
        "code",
        r"\b(code|program|programming|function|python|javascript|java|sql|algorithm|html|css"
        r"|script|c\+\+|array|loop)\b",
    ),
    (
        "math",
        r"\b(calculate|compute|number|numbers|equation|sum|solve|math|multiply|divide|percent"
        r"|percentage|area|average|formula)\b|\d+\s*[-+*/x^]\s*\d+",
    ),
    (
        "writing",
        r"\b(write|story|poem|essay|compose|letter|paragraph|slogan|tweet|haiku|lyrics"
        r"|headline)\b",
    ),
)
FALLBACK = "qa"
DESCRIPTIONS = {
    "code": "Writes, explains and fixes source code.",
    "math": "Calculations, numbers, equations and word problems.",
    "writing": "Writes stories, poems, essays, letters and other texts.",
    "qa": "Answers general questions and everyday requests.",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        default=os.environ.get("AIROBOROS_REAL_MODEL", DEFAULT_MODEL),
        help="HF folder of the base model (default $AIROBOROS_REAL_MODEL, else what make model "
        "writes: " + DEFAULT_MODEL + ")",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="alpaca-format JSON")
    p.add_argument("--input", type=Path, default=None, help="airoboros JSONL (category=expert)")
    p.add_argument("--rows-per-expert", type=int, default=40)
    p.add_argument("--held-out", type=int, default=30)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=4, help="packed rows per step")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--split-above", type=int, default=None, metavar="N")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workdir", type=Path, default=None)
    return p.parse_args(argv)


def expert_of(instruction: str) -> str:
    for name, pattern in RULES:
        if re.search(pattern, instruction, re.IGNORECASE):
            return name
    return FALLBACK


def load_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.input is not None:
        from airoboros.trainer.segment import read_rows

        return [dict(r, category=r.get("category") or FALLBACK) for r in read_rows([args.input])]
    rows = []
    for item in json.loads(args.data.read_text()):
        instruction = item["instruction"].strip()
        if item.get("input", "").strip():
            instruction += "\n" + item["input"].strip()
        if instruction and item["output"].strip():
            rows.append(
                {
                    "instruction": instruction,
                    "response": item["output"],
                    "category": expert_of(item["instruction"]),
                }
            )
    return rows


def split_rows(
    rows: list[dict[str, Any]], tokenizer: Any, args: argparse.Namespace
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """Per expert: (train, held-out), seeded; rows too long for --max-seq-len left out."""
    from airoboros.trainer.data import format_examples

    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["category"], []).append(r)
    train: dict[str, list[dict[str, Any]]] = {}
    held: dict[str, list[dict[str, Any]]] = {}
    for name in sorted(by):
        rs = by[name]
        random.Random(f"{args.seed}:{name}").shuffle(rs)
        fits = []
        need = args.rows_per_expert + args.held_out
        for r in rs:
            ex, _ = format_examples([r], tokenizer, args.max_seq_len)
            if ex:
                fits.append(r)
            if len(fits) == need:
                break
        if len(fits) < 2:
            continue
        cut = max(1, min(args.rows_per_expert, len(fits) - args.held_out))
        train[name], held[name] = fits[:cut], fits[cut:]
    return train, held


def train_config(args: argparse.Namespace, rank: int, max_steps: int = -1) -> Any:
    from airoboros.trainer.train import TrainConfig

    return TrainConfig(
        lora_r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        epochs=args.epochs,
        max_steps=max_steps,
        learning_rate=args.lr,
        warmup_ratio=0.0,
        max_length=args.max_seq_len,
        batch_size=args.batch,
        eval_fraction=0.0,
        save_steps=10**9,
        logging_steps=10**6,
        gradient_checkpointing=False,
        precision="auto" if args.device == "cuda" else "fp32",
        quantize_4bit="off",
        seed=args.seed,
    )


def train(
    base: str, rows: list[dict[str, Any]], out: Path, name: str, cfg: Any
) -> tuple[Path, dict[str, Any]]:
    """Train (or, when ``out`` holds a finished run of the same rows and config, reuse: a
    rerun with the same --workdir only trains what changed)."""
    import dataclasses
    import hashlib

    from airoboros.trainer.train import train_expert

    key = hashlib.sha256(
        json.dumps([base, rows, dataclasses.asdict(cfg)], sort_keys=True, default=str).encode()
    ).hexdigest()
    done = out / "bench_run.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved.get("key") == key and Path(saved["adapter"]).is_dir():
            return Path(saved["adapter"]), dict(saved["metrics"])
    res = train_expert(base, rows, out, expert=name, config=cfg, progress=False)
    metrics = dict(res.metrics)
    done.write_text(json.dumps({"key": key, "adapter": str(res.adapter_dir), "metrics": metrics}))
    return res.adapter_dir, metrics


def row_losses(
    model: Any, rows: list[dict[str, Any]], tokenizer: Any, args: argparse.Namespace
) -> list[tuple[float, int]]:
    """(summed NLL, response tokens) per row, unpacked, the trainer's formatting."""
    import torch

    from airoboros.trainer.data import format_examples

    examples, dropped = format_examples(rows, tokenizer, args.max_seq_len)
    assert not dropped
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[tuple[float, int]] = []
    model.eval()
    with torch.no_grad():
        for s in range(0, len(examples), 8):
            batch = examples[s : s + 8]
            longest = max(len(e["input_ids"]) for e in batch)
            ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            labels = torch.full((len(batch), longest), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for i, e in enumerate(batch):
                n = len(e["input_ids"])
                ids[i, :n] = torch.tensor(e["input_ids"])
                labels[i, :n] = torch.tensor(e["labels"])
                mask[i, :n] = 1
            ids, labels, mask = ids.to(args.device), labels.to(args.device), mask.to(args.device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
            )
            counts = (labels[:, 1:] != -100).sum(dim=1)
            for i in range(len(batch)):
                out.append((float(nll[i].sum()), int(counts[i])))
    return out


def mean(losses: list[tuple[float, int]]) -> float:
    tokens = sum(n for _, n in losses)
    return sum(s for s, _ in losses) / tokens if tokens else math.nan


class Evaluator:
    """Per-row losses of the base model and of each adapter, on one loaded base model."""

    def __init__(self, base: str, tokenizer: Any, args: argparse.Namespace) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(args.device)
        self.tokenizer = tokenizer
        self.args = args
        self.peft: Any = None

    def losses(self, adapter: Path | None, rows: list[dict[str, Any]]) -> list[tuple[float, int]]:
        from peft import PeftModel

        if adapter is None:
            if self.peft is None:
                return row_losses(self.model, rows, self.tokenizer, self.args)
            with self.peft.disable_adapter():
                return row_losses(self.peft, rows, self.tokenizer, self.args)
        name = adapter.parent.name.replace(".", "_")
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, adapter, adapter_name=name)
        elif name not in self.peft.peft_config:
            self.peft.load_adapter(adapter, adapter_name=name)
        self.peft.set_adapter(name)
        return row_losses(self.peft, rows, self.tokenizer, self.args)


async def route_all(
    embedder: Any, package: Path, texts: list[str]
) -> tuple[list[str | None], dict[str, str]]:
    from airoboros.router.routing import Router

    router = Router(embedder)
    await router.load_package(str(package))
    out: list[str | None] = []
    for t in texts:
        d = await router.route(t)
        out.append(d.expert if d is not None else None)
    return out, router.descriptions()


def write_package(seg: Any, package: Path) -> None:
    """The router's view of an LMoE package: routing_data/ and adapters/<e>/description.txt."""
    from airoboros.trainer.segment import write_segmentation

    write_segmentation(seg, package)
    for name, e in seg.expert_map.experts.items():
        if seg.routing.get(name):
            d = package / "adapters" / name
            d.mkdir(parents=True, exist_ok=True)
            (d / "description.txt").write_text(e.description + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = Path(args.model)
    if not (model / "config.json").is_file():
        print(f"experts_bench: no model at {model} (build it: make model)", file=sys.stderr)
        return 2
    import asyncio

    import torch
    from transformers import AutoTokenizer

    from airoboros.embeddings import SentenceTransformerEmbedder
    from airoboros.trainer.segment import (
        Expert,
        ExpertMap,
        routing_row,
        segment,
        split_experts,
    )

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="experts_bench_"))
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    rows = load_rows(args)
    train_rows, held = split_rows(rows, tokenizer, args)
    names = list(train_rows)
    emap = ExpertMap(
        experts={
            n: Expert(n, (n,), DESCRIPTIONS.get(n, f"Requests of category {n}.")) for n in names
        },
        fallback=names[0],
    )
    all_train = [r for n in names for r in train_rows[n]]
    seg = segment(all_train, emap, seed=args.seed)
    print(
        f"experts_bench: model {model.name}, device {args.device}, threads {args.threads}, "
        f"rule: first keyword match of {', '.join(n for n, _ in RULES)}, else {FALLBACK}"
        if args.input is None
        else f"experts_bench: model {model.name}, input {args.input} (category = expert)"
    )
    print(
        "rows per expert (train own+cross / held-out): "
        + ", ".join(f"{n} {len(seg.training[n])} / {len(held[n])}" for n in names)
    )

    # (a) one LoRA per expert
    adapters: dict[str, Path] = {}
    steps_a = tokens_a = 0
    for n in names:
        adapters[n], m = train(
            str(model), seg.training[n], workdir / "a" / n, n, train_config(args, args.lora_r)
        )
        steps_a += int(m["steps"])
        tokens_a += int(m["tokens"])
    # (b) one LoRA, rank r x experts, on the same rows for the same epochs: the same
    # training tokens (its packing across experts needs a few fewer steps)
    single_rows = [r for n in names for r in seg.training[n]]
    rank_b = args.lora_r * len(names)
    single, mb = train(
        str(model),
        single_rows,
        workdir / "b" / "single",
        "single",
        train_config(args, rank_b),
    )
    print(
        f"training: (a) {len(names)} LoRAs r={args.lora_r}, {steps_a} steps, {tokens_a} tokens; "
        f"(b) one LoRA r={rank_b}, {mb['steps']} steps, {mb['tokens']} tokens"
    )

    # routing
    embedder = SentenceTransformerEmbedder(device=args.device)
    write_package(seg, workdir / "package")
    held_rows = [(n, r) for n in names for r in held[n]]
    texts = [routing_row(r)["instruction"] for _, r in held_rows]
    routed, _ = asyncio.run(route_all(embedder, workdir / "package", texts))
    accuracy = sum(1 for (n, _), e in zip(held_rows, routed, strict=True) if e == n) / len(texts)

    ev = Evaluator(str(model), tokenizer, args)
    flat = [r for _, r in held_rows]
    base_l = ev.losses(None, flat)
    # each adapter only on the rows it is the oracle or the routed expert for
    per_adapter: dict[str, dict[int, tuple[float, int]]] = {}
    for n in names:
        need = [i for i, (h, _) in enumerate(held_rows) if n in (h, routed[i])]
        got = ev.losses(adapters[n], [flat[i] for i in need]) if need else []
        per_adapter[n] = dict(zip(need, got, strict=True))
    single_l = ev.losses(single, flat)
    oracle_l = [per_adapter[n][i] for i, (n, _) in enumerate(held_rows)]
    routed_l = [per_adapter[e][i] if e in per_adapter else base_l[i] for i, e in enumerate(routed)]

    def pick(losses: list[tuple[float, int]], name: str | None) -> list[tuple[float, int]]:
        return [x for x, (n, _) in zip(losses, held_rows, strict=True) if name in (None, n)]

    print()
    print("| expert | held-out | base | ensemble routed | oracle | single LoRA | routed right |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n in [*names, None]:
        idx = [i for i, (h, _) in enumerate(held_rows) if n in (None, h)]
        right = sum(1 for i in idx if routed[i] == held_rows[i][0])
        print(
            f"| {n or 'all'} | {len(idx)} | {mean(pick(base_l, n)):.4f} | "
            f"{mean(pick(routed_l, n)):.4f} | {mean(pick(oracle_l, n)):.4f} | "
            f"{mean(pick(single_l, n)):.4f} | {right}/{len(idx)} |"
        )
    summary = (
        f"experts: held-out loss base = {mean(base_l):.4f}, ensemble routed = "
        f"{mean(routed_l):.4f}, oracle = {mean(oracle_l):.4f}, single LoRA = "
        f"{mean(single_l):.4f}; routing accuracy = {accuracy:.3f}"
    )

    split_line = None
    if args.split_above is not None:
        result = split_experts(
            all_train, emap, above=args.split_above, embed=embedder.embed, seed=args.seed
        )
        split = [s for s in result.splits if s.parts]
        for s in result.splits:
            print(f"split {s.expert} ({s.rows} rows): {s.reason}")
        if not split:
            split_line = f"split: no expert of more than {args.split_above} rows was split"
        else:
            seg2 = segment(result.rows, result.expert_map, seed=args.seed)
            write_package(seg2, workdir / "package_split")
            parts = [p.name for s in split for p in s.parts]
            sub_adapters = {
                p: train(
                    str(model), seg2.training[p], workdir / "split" / p, p,
                    train_config(args, args.lora_r),
                )[0]
                for p in parts
            }  # fmt: skip
            whole = {s.expert for s in split}
            idx = [i for i, (n, _) in enumerate(held_rows) if n in whole]
            sub_texts = [texts[i] for i in idx]
            sub_routed, _ = asyncio.run(route_all(embedder, workdir / "package_split", sub_texts))
            sub_rows = [flat[i] for i in idx]
            unsplit = [oracle_l[i] for i in idx]
            losses = []
            for j, e in enumerate(sub_routed):
                if e in sub_adapters:
                    losses.append(ev.losses(sub_adapters[e], [sub_rows[j]])[0])
                elif e in adapters:
                    losses.append(ev.losses(adapters[e], [sub_rows[j]])[0])
                else:
                    losses.append(base_l[idx[j]])
            to_parts = sum(1 for e in sub_routed if e in sub_adapters)
            split_line = (
                f"split: held-out loss on {', '.join(sorted(whole))} rows: unsplit expert = "
                f"{mean(unsplit):.4f}, split experts routed = {mean(losses):.4f} "
                f"({len(parts)} sub-experts: {', '.join(parts)}; {to_parts}/{len(idx)} rows "
                "routed to a sub-expert)"
            )
    print()
    print(f"(wall time {time.perf_counter() - started:.0f} s; work folder {workdir})")
    print(summary)
    if split_line:
        print(split_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
