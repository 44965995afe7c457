"""LoRA training throughput: ours (packed, airoboros.trainer.train) against a plain script.

One random-weight Llama, one dataset, one pass over the same training rows for both:

  (a) plain  the usual peft + HF Trainer script: tokenize each row (same prompt format and
             prompt masking), DataCollatorForSeq2Seq pads each random batch of --batch rows to
             its longest, no packing, no length grouping.
  (b) ours   train_expert with packing: rows of up to --max-length tokens, position ids
             restarting per example; packed rows per step chosen so that a step holds about
             as many real tokens as a plain step (so both take about the same number of
             optimizer steps at the same learning rate).

Both see exactly the same examples (rows too long for --max-length are removed first) and so
the same number of real training tokens. Speed: training samples/s of each (wall time of the
Trainer's train loop; ours includes its final checkpoint save) and the ratio (target >= 1.5x).
Quality at equal tokens: after the pass, the mean loss per response token on the same
held-out rows, computed the same way for both (unpacked, one padded batch at a time); ours
should be no worse than plain (target: at most 1% above it). Reports only; exits 0.

    .venv/bin/python bench/trainer_bench.py [--n 1000] [--eval-n 200] [--threads 2]
        [--device cpu|cuda] [--model-size tiny|1b] [--max-length 512] [--batch 16]
        [--lr 1e-3] [--lora-r 64] [--gradient-checkpointing auto|on|off] [--ours-4bit]
        [--data PATH] [--workdir DIR]

On a GPU: --device cuda --model-size 1b (a TinyLlama-shaped 1.1B config, bf16 for both; pass
--ours-4bit to let ours use QLoRA when bitsandbytes is installed, which is then not like for
like). Timings are wall-clock: on a shared machine, run it twice.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_5000.json"

SIZES: dict[str, dict[str, Any]] = {
    # Small enough for 2 CPU cores, big enough that matmuls, not Python, dominate a step.
    "tiny": {"hidden": 256, "layers": 4, "heads": 8, "kv_heads": 8, "vocab_size": 8000},
    # TinyLlama-1.1B's shape.
    "1b": {
        "hidden": 2048,
        "layers": 22,
        "heads": 32,
        "kv_heads": 4,
        "intermediate": 5632,
        "vocab_size": 32000,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000, help="training rows (before length filter)")
    p.add_argument("--eval-n", type=int, default=200, help="held-out rows for the eval loss")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model-size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=16, help="plain: examples per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument(
        "--gradient-checkpointing",
        choices=["auto", "on", "off"],
        default="auto",
        help="auto: on for 1b, off for tiny (it only costs time at that size)",
    )
    p.add_argument(
        "--ours-4bit",
        action="store_true",
        help="ours: QLoRA when CUDA + bitsandbytes (the plain script stays 16-bit)",
    )
    p.add_argument(
        "--init-range",
        type=float,
        default=0.02,
        help="std of the random weights (Llama's 0.02; ~0.1 lets a short run learn more)",
    )
    p.add_argument("--seed", type=int, default=11422)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    return p.parse_args(argv)


def load_rows(path: Path) -> list[dict[str, str]]:
    """Alpaca items as airoboros rows: the input, when present, goes under the instruction."""
    rows = []
    for item in json.loads(path.read_text()):
        instruction = item["instruction"].strip()
        if item.get("input", "").strip():
            instruction += "\n" + item["input"].strip()
        if instruction and item["output"].strip():
            rows.append(
                {"instruction": instruction, "response": item["output"], "category": "general"}
            )
    return rows


def build_model(workdir: Path, rows: list[dict[str, str]], size: str, args: Any) -> Path:
    from airoboros.trainer.data import build_prompt
    from tests.fakes.tiny_llama import build_tiny_llama, build_tiny_tokenizer

    spec = dict(SIZES[size])
    texts = [build_prompt(r) + r["response"] for r in rows]
    tok = build_tiny_tokenizer(
        texts=texts, vocab_size=spec.pop("vocab_size"), model_max_length=args.max_length
    )
    dtype = "bfloat16" if size == "1b" else "float32"
    return build_tiny_llama(
        workdir / f"base-{size}",
        tokenizer=tok,
        max_position=max(2048, args.max_length),
        seed=args.seed,
        dtype=dtype,
        initializer_range=args.init_range,
        **spec,
    )


def lora_config(args: Any) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.1,
        target_modules="all-linear",
        bias="none",
    )


def run_plain(base: Path, rows: list[dict[str, str]], out: Path, args: Any) -> dict[str, Any]:
    """The usual script: tokenize, DataCollatorForSeq2Seq, Trainer. Returns model + timing."""
    import datasets
    import torch
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(base)

    def tokenize(row: dict[str, str]) -> dict[str, list[int]]:
        prompt = f"{row.get('system') or 'A chat.'}\nUSER: {row['instruction']}\nASSISTANT: "
        source = tok(prompt)["input_ids"]  # BOS + prompt
        target = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return {
            "input_ids": source + target,
            "attention_mask": [1] * (len(source) + len(target)),
            "labels": [-100] * len(source) + target,
        }

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_list(rows).map(tokenize, remove_columns=list(rows[0]))
    bf16 = args.device == "cuda" and torch.cuda.is_bf16_supported()
    set_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.bfloat16 if bf16 else torch.float32
    )
    model.config.use_cache = False
    if args.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(args))
    targs = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=1,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_ratio=0.03,
        max_grad_norm=0.3,
        weight_decay=0.0,
        seed=args.seed,
        bf16=bf16,
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=args.device == "cuda",
        use_cpu=args.device == "cpu",
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=ds,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
    )
    t0 = time.perf_counter()
    trainer.remove_callback(PrinterCallback)  # quiet output; logging itself stays on
    trainer.train()
    loop = time.perf_counter() - t0
    lengths = [len(x) for x in ds["input_ids"]]
    # Not the exact batches (the Trainer shuffles), but the same expected padding.
    padded = sum(
        max(lengths[i : i + args.batch]) * len(lengths[i : i + args.batch])
        for i in range(0, len(lengths), args.batch)
    )
    return {
        "model": trainer.model,
        "loop_s": loop,
        "total_s": time.perf_counter() - started,
        "steps": trainer.state.global_step,
        "positions": padded,
    }


def run_ours(
    base: Path, rows: list[dict[str, str]], out: Path, rows_per_step: int, args: Any
) -> dict[str, Any]:
    from airoboros.trainer.train import TrainConfig, train_expert

    cfg = TrainConfig(
        epochs=1,
        batch_size=rows_per_step,
        max_length=args.max_length,
        learning_rate=args.lr,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        gradient_checkpointing=args.gc,
        eval_fraction=0.0,
        save_steps=10**9,
        logging_steps=10,
        seed=args.seed,
        quantize_4bit="auto" if args.ours_4bit else "off",
    )
    started = time.perf_counter()
    res = train_expert(base, rows, out, expert="bench", config=cfg, progress=False)
    return {
        "adapter": res.adapter_dir,
        "loop_s": float(res.metrics["seconds"]),
        "total_s": time.perf_counter() - started,
        "steps": int(res.metrics["steps"]),
        "positions": int(res.metrics["packed_rows"]) * args.max_length,  # upper bound
        "metrics": res.metrics,
    }


def eval_loss(model: Any, examples: list[dict[str, list[int]]], pad_id: int, device: str) -> float:
    """Mean negative log-likelihood per response token (the tokens with labels), unpacked."""
    import torch

    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    with torch.no_grad():
        for s in range(0, len(order), 16):
            batch = [examples[i] for i in order[s : s + 16]]
            longest = max(len(e["input_ids"]) for e in batch)
            ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), longest), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for r, e in enumerate(batch):
                n = len(e["input_ids"])
                ids[r, :n] = torch.tensor(e["input_ids"])
                labels[r, :n] = torch.tensor(e["labels"])
                mask[r, :n] = 1
            ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            # logits[:, t] predicts token t+1.
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(nll)
            count += int((labels[:, 1:] != -100).sum())
    return total / count


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    args.gc = {"on": True, "off": False}.get(args.gradient_checkpointing, args.model_size == "1b")

    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from airoboros.trainer.data import format_example, format_examples

    rows = load_rows(args.data)
    random.Random(args.seed).shuffle(rows)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="trainer-bench-"))
    t = time.perf_counter()
    base = build_model(workdir, rows, args.model_size, args)
    build_s = time.perf_counter() - t
    tok = AutoTokenizer.from_pretrained(base)

    # Same rows for both: only those that fit max_length (the plain script would truncate
    # them, ours drops them; neither then trains on a different set).
    pool = rows[: args.eval_n + args.n]
    fits = {id(r) for r in pool if format_example(r, tok, args.max_length) is not None}
    eval_rows = [r for r in pool[: args.eval_n] if id(r) in fits]
    train_rows = [r for r in pool[args.eval_n :] if id(r) in fits]
    eval_ex, _ = format_examples(eval_rows, tok, args.max_length)
    train_ex, _ = format_examples(train_rows, tok, args.max_length)
    real_tokens = sum(len(e["input_ids"]) for e in train_ex)
    mean_len = real_tokens / len(train_ex)
    rows_per_step = max(1, round(args.batch * mean_len / args.max_length))

    with torch.device("meta"):
        shape_only = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    n_params = sum(p.numel() for p in shape_only.parameters())
    print(
        f"model: {args.model_size} Llama, {n_params / 1e6:.1f}M params (built in {build_s:.1f} s), "
        f"vocab {len(tok)}, device {args.device}, threads {torch.get_num_threads()}, "
        f"gradient checkpointing {'on' if args.gc else 'off'}"
    )
    print(
        f"data: {len(train_rows)} training rows ({args.n - len(train_rows)} over "
        f"{args.max_length} tokens removed), {real_tokens} tokens, mean {mean_len:.0f}/example; "
        f"{len(eval_rows)} held-out rows"
    )
    print(
        f"steps: plain {args.batch} examples/step; ours {rows_per_step} packed rows of "
        f"<= {args.max_length} tokens/step; lr {args.lr}, LoRA r={args.lora_r} "
        f"alpha={args.lora_alpha}, 1 epoch each"
    )
    device = args.device

    plain = run_plain(base, train_rows, workdir / "plain", args)
    plain_eval = eval_loss(plain["model"], eval_ex, tok.pad_token_id, device)
    del plain["model"]
    if device == "cuda":
        torch.cuda.empty_cache()

    ours = run_ours(base, train_rows, workdir / "ours", rows_per_step, args)
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else None
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or torch.float32).to(device)
    base_eval = eval_loss(base_model, eval_ex, tok.pad_token_id, device)
    tuned = PeftModel.from_pretrained(base_model, ours["adapter"]).to(device)
    ours_eval = eval_loss(tuned, eval_ex, tok.pad_token_id, device)

    n = len(train_rows)
    print()
    print(
        f"{'':8} {'steps':>6} {'loop s':>8} {'total s':>8} {'samples/s':>10} "
        f"{'tokens/s':>9} {'positions':>10} {'eval loss':>10}"
    )
    for name, r, ev in (("plain", plain, plain_eval), ("ours", ours, ours_eval)):
        print(
            f"{name:8} {r['steps']:>6} {r['loop_s']:>8.1f} {r['total_s']:>8.1f} "
            f"{n / r['loop_s']:>10.2f} {real_tokens / r['loop_s']:>9.0f} {r['positions']:>10} "
            f"{ev:>10.4f}"
        )
    print(f"(untrained base model: eval loss {base_eval:.4f})")
    ratio = plain["loop_s"] / ours["loop_s"]
    rel = (ours_eval - plain_eval) / plain_eval
    print(
        f"padding: plain computes on ~{plain['positions'] / real_tokens:.2f}x the real tokens, "
        f"ours on <= {ours['positions'] / real_tokens:.2f}x"
    )
    print(
        f"trainer: ours/plain samples/s = {ratio:.2f}x (target 1.5x); eval loss at equal "
        f"tokens ({real_tokens}): ours {ours_eval:.4f} vs plain {plain_eval:.4f} "
        f"({rel:+.1%}, target <= +1%)"
    )


if __name__ == "__main__":
    main()
