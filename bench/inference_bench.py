"""Mixed-adapter continuous batching vs the original's one-adapter-at-a-time serving.

Builds a random-weight Llama and 4 random LoRA adapters (an LMoE layout) in a temporary
folder, then serves the same greedy requests (``--requests-per-adapter`` per adapter,
``--max-new-tokens`` each) three ways, in one process:

* **original**: what the original HF server did (reference §4.2, §4.7): a ``PeftModel``
  with every adapter loaded, requests strictly one at a time under a lock,
  ``set_adapter(name)`` then ``generate(do_sample=False, use_cache=False)``;
* **original + KV cache**: the same, one at a time, with ``use_cache=True``;
* **ours**: ``LocalEngine``, every request submitted at once (``asyncio.gather``), all
  adapters mixed in each forward pass (peft ``adapter_names``).

By default EOS is ignored by all three (``--respect-eos`` to stop at it), so that every
request generates exactly ``--max-new-tokens`` tokens; tokens/s are computed on the tokens
actually generated anyway. Every output of ours is compared with the original's for the
same request (decoded text; fp32 batching can flip a near-tie argmax, so a few may differ).

    .venv/bin/python bench/inference_bench.py [--hidden 256] [--layers 4] [--threads 2]
        [--device cpu|cuda] [--model-size tiny|1b] [--requests-per-adapter 16]
        [--max-new-tokens 32] [--respect-eos]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airoboros.inference.backend import GenerationRequest, SamplingParams  # noqa: E402
from airoboros.inference.engine import LocalEngine  # noqa: E402
from airoboros.inference.settings import InferenceSettings  # noqa: E402
from tests.fakes.tiny_llama import build_tiny_llama  # noqa: E402

ADAPTERS = ("qa", "creative", "code", "reasoning")
TOPICS = (
    "the capital of France",
    "a haiku about the sea",
    "adding 2 and 3",
    "a robot who paints the stars at night",
    "how far a train travels in three hours",
    "the quick brown fox",
    "a journey of a thousand miles",
    "why the scarecrow won an award",
    "a long river",
    "a python function that adds two numbers",
    "three keywords for a summary",
    "the numbers 0 1 2 3 4 5 6 7 8 9",
    "the salt wind and the gulls",
    "a small robot who wanted to learn",
    "the tide that keeps its time",
    "a helpful assistant",
)


def prompts_for(n_per_adapter: int) -> list[tuple[str, str]]:
    """(adapter, prompt) pairs, adapters interleaved, prompts of varied lengths."""
    out = []
    for i in range(n_per_adapter):
        for j, name in enumerate(ADAPTERS):
            topic = TOPICS[(i + 3 * j) % len(TOPICS)]
            extra = " Please be brief." * ((i + j) % 3)
            out.append((name, f"A chat.\nUSER: Tell me about {topic}.{extra}\nASSISTANT: "))
    return out


def make_adapter(base: Any, out: Path, seed: int, description: str) -> Any:
    """A LoRA with random A and B saved to ``out``; returns the base model, unwrapped."""
    from tests.fakes.tiny_llama import make_lora_adapter

    return make_lora_adapter(
        base,
        out,
        seed,
        rank=8,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
        description=description,
    )


def build(root: Path, args: argparse.Namespace) -> tuple[Path, int]:
    from transformers import AutoModelForCausalLM

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.model_size == "1b":
        # TinyLlama-1.1B's shape (the tiny tokenizer's vocabulary makes it ~0.97B params).
        base = build_tiny_llama(
            root / "base",
            hidden=2048,
            layers=22,
            heads=32,
            kv_heads=4,
            intermediate=5632,
            dtype=dtype,
            initializer_range=0.02,
        )
    else:
        base = build_tiny_llama(
            root / "base", hidden=args.hidden, layers=args.layers, initializer_range=0.1
        )
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto")
    for seed, name in enumerate(ADAPTERS, start=1):
        model = make_adapter(model, root / "lmoe" / "adapters" / name, seed, f"the {name} expert")
    return base, sum(p.numel() for p in model.parameters())


def encode(tok: Any, prompt: str) -> list[int]:
    return [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]


def run_original(
    base: Path, root: Path, work: list[tuple[str, str]], args: argparse.Namespace, use_cache: bool
) -> tuple[float, int, list[str]]:
    """One request at a time under a global lock: set_adapter, then generate."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(str(base))
    model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    adapters = root / "lmoe" / "adapters"
    model = PeftModel.from_pretrained(model, str(adapters / ADAPTERS[0]), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.load_adapter(str(adapters / name), adapter_name=name)
    model.to(device).eval()
    eos = tok.eos_token_id
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        use_cache=use_cache,
        eos_token_id=eos if args.respect_eos else None,
        pad_token_id=tok.pad_token_id,
    )
    lock = threading.Lock()

    def serve(adapter: str, prompt: str) -> list[int]:
        with lock, torch.inference_mode():
            model.set_adapter(adapter)
            ids = torch.tensor([encode(tok, prompt)], device=device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                generation_config=config,
                use_model_defaults=False,  # keep eos_token_id=None (ignore EOS) as given
            )
            new = out[0, ids.shape[1] :].tolist()
        if args.respect_eos and eos in new:
            new = new[: new.index(eos) + 1]
        return [int(t) for t in new]

    serve(*work[0])  # warm up
    sync(args.device)
    t0 = time.perf_counter()
    outs = [serve(adapter, prompt) for adapter, prompt in work]
    sync(args.device)
    elapsed = time.perf_counter() - t0
    texts = [str(tok.decode(o, skip_special_tokens=True)) for o in outs]
    return elapsed, sum(len(o) for o in outs), texts


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


async def run_ours(
    base: Path, root: Path, work: list[tuple[str, str]], args: argparse.Namespace
) -> tuple[float, int, list[str], dict[str, int]]:
    settings = InferenceSettings(
        base_model=str(base),
        model_id="bench-base",
        lmoe_paths=str(root / "lmoe"),
        cache_dir=str(root / "cache"),
        device=args.device,
        dtype="bfloat16" if args.device == "cuda" else "float32",
        max_batch_size=len(work),
        max_waiting=max(1024, 2 * len(work)),
        max_resident_adapters=len(ADAPTERS),
        api_keys="",
    )
    engine = LocalEngine(settings)
    await engine.start()
    if not args.respect_eos:
        engine._eos = set()  # bench only: generate exactly max_new_tokens, like the baseline

    async def one(adapter: str, prompt: str, max_tokens: int) -> tuple[str, int]:
        (gen,) = await engine.submit(
            GenerationRequest(
                adapter=adapter,
                prompt=prompt,
                max_tokens=max_tokens,
                sampling=SamplingParams(temperature=0),
            )
        )
        text = "".join([c.text async for c in gen])
        return text, gen.completion_tokens

    try:
        await asyncio.gather(*(one(a, p, 4) for a, p in work[: len(ADAPTERS)]))  # warm up
        sync(args.device)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(a, p, args.max_new_tokens) for a, p in work))
        sync(args.device)
        elapsed = time.perf_counter() - t0
    finally:
        await engine.close()
    return elapsed, sum(n for _, n in results), [t for t, _ in results], dict(engine.stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model-size", choices=["tiny", "1b"], default="tiny")
    parser.add_argument("--requests-per-adapter", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--respect-eos", action="store_true", help="stop at EOS (all three)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = prompts_for(args.requests_per_adapter)
    with tempfile.TemporaryDirectory(prefix="inference-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        base, params = build(root, args)
        print(
            f"setup: model={args.model_size} ({params / 1e6:.1f}M params"
            + (f", hidden {args.hidden}, {args.layers} layers" if args.model_size == "tiny" else "")
            + f"), device={args.device}, threads={args.threads}, adapters={len(ADAPTERS)}, "
            f"requests={len(work)} ({args.requests_per_adapter}/adapter), "
            f"max_new_tokens={args.max_new_tokens}, eos={'respected' if args.respect_eos else 'ignored'}, "
            f"built in {time.perf_counter() - t0:.1f}s"
        )
        rows = []
        orig_t, orig_n, orig_texts = run_original(base, root, work, args, use_cache=False)
        rows.append(("original (lock, no cache)", orig_t, orig_n))
        cache_t, cache_n, cache_texts = run_original(base, root, work, args, use_cache=True)
        rows.append(("original + KV cache", cache_t, cache_n))
        ours_t, ours_n, ours_texts, stats = asyncio.run(run_ours(base, root, work, args))
        rows.append(("ours (LocalEngine, mixed batch)", ours_t, ours_n))

    for label, secs, n in rows:
        print(f"{label:34s} {n:6d} tokens in {secs:8.2f}s = {n / secs:9.1f} tokens/s")
    print(
        f"engine stats: steps={stats['steps']}, max_batch={stats['max_batch']}, "
        f"max_adapters_per_pass={stats['max_adapters']}"
    )
    ours_rate = ours_n / ours_t
    r_orig = ours_rate / (orig_n / orig_t)
    r_cache = ours_rate / (cache_n / cache_t)
    same = sum(a == b for a, b in zip(ours_texts, orig_texts, strict=True))
    same_cache = sum(a == b for a, b in zip(cache_texts, orig_texts, strict=True))
    print(f"greedy outputs: ours == original for {same}/{len(work)} requests")
    print(f"greedy outputs: original+cache == original for {same_cache}/{len(work)} requests")
    print(
        f"inference: ours/original = {r_orig:.1f}x (target 4x), "
        f"ours/original+cache = {r_cache:.1f}x"
    )


if __name__ == "__main__":
    main()
