"""Mixed-adapter continuous batching vs the original's one-adapter-at-a-time serving.

Builds a random-weight Llama and 4 random LoRA adapters (an LMoE layout) in a temporary
folder, then serves the same greedy requests (``--requests-per-adapter`` per adapter,
``--max-new-tokens`` each) three ways, in one process:

* **original**: what the original HF server did (reference §4.2, §4.7): a ``PeftModel``
  with every adapter loaded, requests strictly one at a time under a lock,
  ``set_adapter(name)`` then ``generate(do_sample=False, use_cache=False)``;
* **original + KV cache**: the same, one at a time, with ``use_cache=True``;
* **ours**: ``LocalEngine``, every request submitted at once (``asyncio.gather``), all
  adapters mixed in each forward pass (the stacked LoRA of services/inference/lora.py),
  and once more with ``mixed_lora="peft"`` (peft's ``adapter_names``) for comparison.

By default EOS is ignored by all three (``--respect-eos`` to stop at it), so that every
request generates exactly ``--max-new-tokens`` tokens; tokens/s are computed on the tokens
actually generated anyway. Every output of ours is compared with the original's for the
same request (decoded text; fp32 batching can flip a near-tie argmax, so a few may differ).

With ``--model PATH`` (a HF folder, e.g. the real SmolLM2-135M-Instruct that ``make model``
writes) the base is that model, with 4 random rank-8 adapters on it, and two more
comparisons run:

* **transformers + peft, one static batch**: every request in ONE ``generate`` call, left
  padded, mixed adapters through ``adapter_names=``, KV cache on;
* **HTTP** (``--http-streams 8,32``): ``python -m airoboros.lmoe.api`` (inference service +
  router, real HTTP on loopback) and that many concurrent streamed chat completions
  (httpx, ``model: <adapter>``), tokens/s as a fraction of the engine alone on the same
  requests (EOS respected by both, as the API has no way to ignore it).

    .venv/bin/python bench/inference_bench.py [--hidden 256] [--layers 4] [--threads 2]
        [--device cpu|cuda] [--model-size tiny|1b] [--requests-per-adapter 16]
        [--max-new-tokens 32] [--respect-eos]
    .venv/bin/python bench/inference_bench.py --model build/models/SmolLM2-135M-Instruct \
        --requests-per-adapter 8 --max-new-tokens 64 --threads 2 [--http-streams 8,32]
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
from airoboros.inference.prompt import PromptTurn, render_chat  # noqa: E402
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


def make_adapter(base: Any, out: Path, seed: int, description: str, b_scale: float = 1.0) -> Any:
    """A LoRA with random A and B saved to ``out``; returns the base model, unwrapped."""
    from tests.fakes.tiny_llama import make_lora_adapter

    return make_lora_adapter(
        base,
        out,
        seed,
        rank=8,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
        description=description,
        b_scale=b_scale,
    )


def build(root: Path, args: argparse.Namespace) -> tuple[Path, int]:
    from transformers import AutoModelForCausalLM

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.model:
        base = Path(args.model).resolve()
    elif args.model_size == "1b":
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
        # On a real model, small adapters keep the answers sensible (so that they end at
        # EOS at their own lengths, as trained experts' answers do).
        model = make_adapter(
            model,
            root / "lmoe" / "adapters" / name,
            seed,
            f"the {name} expert",
            b_scale=0.1 if args.model else 1.0,
        )
    return base, sum(p.numel() for p in model.parameters())


def encode(tok: Any, prompt: str) -> list[int]:
    ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    return ids if tok.bos_token_id is None else [tok.bos_token_id, *ids]


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


def load_peft(base: Path, root: Path, args: argparse.Namespace) -> tuple[Any, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(str(base))
    model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    adapters = root / "lmoe" / "adapters"
    model = PeftModel.from_pretrained(model, str(adapters / ADAPTERS[0]), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.load_adapter(str(adapters / name), adapter_name=name)
    return tok, model.to(torch.device(args.device)).eval()


def run_static_batch(
    base: Path, root: Path, work: list[tuple[str, str]], args: argparse.Namespace
) -> tuple[float, int, list[str]]:
    """Plain transformers + peft: every request in ONE generate call (left padding, mixed
    adapters through ``adapter_names``, KV cache on)."""
    import torch
    from transformers import GenerationConfig

    tok, model = load_peft(base, root, args)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    device = torch.device(args.device)

    def batch(items: list[tuple[str, str]], max_new: int) -> list[list[int]]:
        ids = [encode(tok, p) for _, p in items]
        width = max(len(i) for i in ids)
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
        config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=False,
            use_cache=True,
            eos_token_id=eos if args.respect_eos else None,
            pad_token_id=pad,
        )
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                adapter_names=[a for a, _ in items],
                generation_config=config,
                use_model_defaults=False,
            )
        rows = []
        for row in out[:, width:].tolist():
            if args.respect_eos and eos in row:
                row = row[: row.index(eos) + 1]
            rows.append([int(t) for t in row])
        return rows

    batch(work[: len(ADAPTERS)], 4)  # warm up
    sync(args.device)
    t0 = time.perf_counter()
    outs = batch(work, args.max_new_tokens)
    sync(args.device)
    elapsed = time.perf_counter() - t0
    texts = [str(tok.decode(o, skip_special_tokens=True)) for o in outs]
    return elapsed, sum(len(o) for o in outs), texts


def write_routing_data(root: Path) -> None:
    import json

    for name in ADAPTERS:
        path = root / "lmoe" / "routing_data" / f"expert_{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps({"instruction": f"A chat. A {name} question about {t}."}) for t in TOPICS
        ]
        path.write_text("\n".join(lines) + "\n")


def start_lmoe_api(base: Path, root: Path, args: argparse.Namespace) -> tuple[Any, str]:
    """``python -m airoboros.lmoe.api`` (inference + router) on a free loopback port."""
    import socket
    import subprocess

    import httpx

    write_routing_data(root)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    env.pop("AIROBOROS_API_KEYS", None)
    log = (root / "lmoe-api.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "airoboros.lmoe.api", "--base-model", str(base),
         "--lmoe", str(root / "lmoe"), "--port", str(port), "--api-keys", "",
         # the prompt the engine-alone run renders (chat=True): the same tokens both ways
         "--prompt-format", "chat-template"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((root / "lmoe-api.log").read_text()[-3000:])
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("the LMoE API did not start: " + (root / "lmoe-api.log").read_text()[-3000:])


async def run_http(url: str, work: list[tuple[str, str]], max_tokens: int) -> tuple[float, int]:
    """Every request of ``work`` at once as a streamed chat completion through the router;
    tokens from the streams' usage."""
    import json

    import httpx

    async def one(client: httpx.AsyncClient, adapter: str, prompt: str, n: int) -> int:
        body = {
            "model": adapter,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": n,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        tokens = 0
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RuntimeError(f"stream error: {event['error']}")
                    if event.get("usage"):
                        tokens = int(event["usage"]["completion_tokens"])
        return tokens

    limits = httpx.Limits(max_connections=len(work) + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(one(client, a, p, 4) for a, p in work[: len(ADAPTERS)]))
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(client, a, p, max_tokens) for a, p in work))
        elapsed = time.perf_counter() - t0
    return elapsed, sum(counts)


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


async def run_ours(
    base: Path,
    root: Path,
    work: list[tuple[str, str]],
    args: argparse.Namespace,
    respect_eos: bool | None = None,
    chat: bool = False,
    mixed_lora: str = "stacked",
) -> tuple[float, int, list[str], dict[str, int]]:
    """``chat``: the prompt as the API's chat completion makes it (the model's chat
    template), so that the engine alone and the HTTP run generate the same tokens."""
    respect = args.respect_eos if respect_eos is None else respect_eos
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
        mixed_lora=mixed_lora,
        api_keys="",
    )
    engine = LocalEngine(settings)
    await engine.start()
    if not respect:
        engine._eos = set()  # bench only: generate exactly max_new_tokens, like the baseline

    async def one(adapter: str, prompt: str, max_tokens: int) -> tuple[str, int]:
        add_bos = True
        if chat:
            prompt, add_bos = render_chat([PromptTurn("user", prompt)], engine.tokenizer)
        (gen,) = await engine.submit(
            GenerationRequest(
                adapter=adapter,
                prompt=prompt,
                add_bos=add_bos,
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
    parser.add_argument("--model", default="", help="a HF model folder as the base (real weights)")
    parser.add_argument(
        "--http-streams",
        default="8,32",
        help="with --model: concurrent streams through the router ('' for none)",
    )
    parser.add_argument(
        "--skip-original-no-cache", action="store_true", help="skip the slowest baseline"
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = prompts_for(args.requests_per_adapter)
    with tempfile.TemporaryDirectory(prefix="inference-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        base, params = build(root, args)
        print(
            f"setup: model={args.model or args.model_size} ({params / 1e6:.1f}M params"
            + (
                f", hidden {args.hidden}, {args.layers} layers"
                if args.model_size == "tiny" and not args.model
                else ""
            )
            + f"), device={args.device}, threads={args.threads}, adapters={len(ADAPTERS)}, "
            f"requests={len(work)} ({args.requests_per_adapter}/adapter), "
            f"max_new_tokens={args.max_new_tokens}, eos={'respected' if args.respect_eos else 'ignored'}, "
            f"built in {time.perf_counter() - t0:.1f}s"
        )
        rows = []
        cache_t, cache_n, cache_texts = run_original(base, root, work, args, use_cache=True)
        if args.skip_original_no_cache:
            orig_t, orig_n, orig_texts = cache_t, cache_n, cache_texts
        else:
            orig_t, orig_n, orig_texts = run_original(base, root, work, args, use_cache=False)
            rows.append(("original (lock, no cache)", orig_t, orig_n))
        rows.append(("original + KV cache", cache_t, cache_n))
        static = None
        if args.model:
            static = run_static_batch(base, root, work, args)
            rows.append(("transformers+peft, 1 static batch", static[0], static[1]))
        ours_t, ours_n, ours_texts, stats = asyncio.run(run_ours(base, root, work, args))
        rows.append(("ours (LocalEngine, mixed batch)", ours_t, ours_n))
        peft_t, peft_n, _, _ = asyncio.run(run_ours(base, root, work, args, mixed_lora="peft"))
        rows.append(("ours, peft's adapter_names path", peft_t, peft_n))
        http_rows = []
        streams = [int(n) for n in args.http_streams.split(",") if n.strip()] if args.model else []
        if streams:
            proc, url = start_lmoe_api(base, root, args)
            try:
                for n in streams:
                    sub = (work * (n // len(work) + 1))[:n]
                    e_t, e_n, _, _ = asyncio.run(
                        run_ours(base, root, sub, args, respect_eos=True, chat=True)
                    )
                    h_t, h_n = asyncio.run(run_http(url, sub, args.max_new_tokens))
                    http_rows.append((n, e_t, e_n, h_t, h_n))
            finally:
                proc.terminate()
                proc.wait(timeout=60)

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
    print(
        f"inference: ours stacked LoRA / ours through peft's adapter_names = "
        f"{ours_rate / (peft_n / peft_t):.2f}x"
    )
    if static is not None:
        same_static = sum(a == b for a, b in zip(ours_texts, static[2], strict=True))
        print(f"greedy outputs: ours == static batch for {same_static}/{len(work)} requests")
        print(
            f"inference: ours/transformers+peft static batch = "
            f"{ours_rate / (static[1] / static[0]):.2f}x (target 1.5x)"
        )
    for n, e_t, e_n, h_t, h_n in http_rows:
        print(
            f"http: {n} streams through router+inference: {h_n} tokens in {h_t:.2f}s = "
            f"{h_n / h_t:.1f} tokens/s; engine alone {e_n} tokens in {e_t:.2f}s = "
            f"{e_n / e_t:.1f} tokens/s; http/engine = {(h_n / h_t) / (e_n / e_t):.2f} "
            "(target 0.8)"
        )


if __name__ == "__main__":
    main()
