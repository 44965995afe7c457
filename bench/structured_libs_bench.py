"""Which constrained-decoding library the inference service uses: measured, not guessed.

For each candidate (xgrammar, llguidance, lm-format-enforcer, outlines-core) and two
tokenizers (the tiny byte-level BPE of tests/fakes/tiny_llama.py, 512 tokens, and a
32k-token byte-level BPE trained here on the standard library's source, as large as a
real Llama tokenizer's), it measures

* **setup**: preparing the tokenizer for the library (once per process),
* **compile**: turning the instructors' task-list schema into a matcher (once per
  distinct schema; later requests with the same schema hit a cache),
* **mask**: per generated token, computing the allowed-token mask, applying it to the
  logits and advancing the matcher, in microseconds (the decode step's overhead),
* **correct**: of ``--runs`` generations driven by random logits (the worst case: a model
  that knows nothing), how many ended on their own in JSON that jsonschema accepts.

    .venv/bin/python bench/structured_libs_bench.py [--runs 20] [--max-tokens 300]

The baseline of the ratio is the same decode step with no mask (argmax of the logits).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "tasks": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"instruction": {"type": "string"}},
                "required": ["instruction"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["tasks"],
    "additionalProperties": False,
}


def big_tokenizer(vocab: int) -> Any:
    from tests.fakes.tiny_llama import build_tiny_tokenizer

    lib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(lib.glob("*.py"))]
    return build_tiny_tokenizer(texts=texts, vocab_size=vocab)


class Lib:
    """setup(tok, V) -> state; compile(state, schema) -> factory; factory() -> matcher
    with step(logits) -> token and done() -> bool."""

    name = ""

    def setup(self, tok: Any, vocab: int) -> Any:
        raise NotImplementedError

    def compile(self, state: Any, schema: str) -> Callable[[], Any]:
        raise NotImplementedError


class XGrammar(Lib):
    name = "xgrammar"

    def setup(self, tok: Any, vocab: int) -> Any:
        import xgrammar as xgr

        return xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)

    def compile(self, state: Any, schema: str) -> Callable[[], Any]:
        import torch
        import xgrammar as xgr

        compiled = xgr.GrammarCompiler(state, cache_enabled=False).compile_json_schema(
            schema, any_whitespace=False
        )
        vocab = state.vocab_size

        class M:
            def __init__(self) -> None:
                self.m = xgr.GrammarMatcher(compiled)
                self.mask = xgr.allocate_token_bitmask(1, vocab)

            def step(self, logits: Any) -> int:
                self.m.fill_next_token_bitmask(self.mask)
                xgr.apply_token_bitmask_inplace(logits, self.mask)
                t = int(torch.argmax(logits))
                self.m.accept_token(t)
                return t

            def done(self) -> bool:
                return bool(self.m.is_terminated())

        return M


class LLGuidance(Lib):
    name = "llguidance"

    def setup(self, tok: Any, vocab: int) -> Any:
        import llguidance.hf

        return llguidance.hf.from_tokenizer(tok, vocab)

    def compile(self, state: Any, schema: str) -> Callable[[], Any]:
        import llguidance
        import llguidance.torch as lt
        import torch

        loaded = json.loads(schema)
        loaded["x-guidance"] = {"whitespace_flexible": False}
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(loaded))
        llguidance.LLMatcher(state, grammar)  # compile once (cached by llguidance after)

        class M:
            def __init__(self) -> None:
                self.m = llguidance.LLMatcher(state, grammar)
                self.mask = lt.allocate_token_bitmask(1, state.vocab_size)

            def step(self, logits: Any) -> int:
                lt.fill_next_token_bitmask(self.m, self.mask, 0)
                lt.apply_token_bitmask_inplace(logits, self.mask)
                t = int(torch.argmax(logits))
                self.m.consume_token(t)
                return t

            def done(self) -> bool:
                return bool(self.m.is_stopped())

        return M


class FormatEnforcer(Lib):
    name = "lm-format-enforcer"

    def setup(self, tok: Any, vocab: int) -> Any:
        from lmformatenforcer.integrations.transformers import (
            build_token_enforcer_tokenizer_data,
        )

        return build_token_enforcer_tokenizer_data(tok)

    def compile(self, state: Any, schema: str) -> Callable[[], Any]:
        import torch
        from lmformatenforcer import JsonSchemaParser, TokenEnforcer

        loaded = json.loads(schema)

        class M:
            def __init__(self) -> None:
                self.e = TokenEnforcer(state, JsonSchemaParser(loaded))
                self.ids: list[int] = []
                self.finished = False

            def step(self, logits: Any) -> int:
                allowed = self.e.get_allowed_tokens(self.ids)
                allowed = getattr(allowed, "allowed_tokens", allowed)
                mask = torch.full_like(logits, float("-inf"))
                mask[..., allowed] = 0
                t = int(torch.argmax(logits + mask))
                self.ids.append(t)
                self.finished = t == state.eos_token_id if hasattr(state, "eos_token_id") else False
                return t

            def done(self) -> bool:
                return self.finished

        return M


def run_lib(lib: Lib, tok: Any, vocab: int, runs: int, max_tokens: int) -> dict[str, Any]:
    import jsonschema
    import torch

    eos = tok.eos_token_id
    t0 = time.perf_counter()
    state = lib.setup(tok, vocab)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    factory = lib.compile(state, json.dumps(SCHEMA))
    compile_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    masked = plain = 0.0
    steps = ok = invalid = 0
    for _ in range(runs):
        m = factory()
        out: list[int] = []
        ended = False
        for _ in range(max_tokens):
            logits = torch.randn(1, vocab, generator=gen)
            t0 = time.perf_counter()
            t = m.step(logits)
            masked += time.perf_counter() - t0
            t0 = time.perf_counter()
            int(torch.argmax(logits))
            plain += time.perf_counter() - t0
            steps += 1
            if t == eos:
                ended = True
                break
            out.append(t)
            if m.done():
                ended = True
                break
        try:
            jsonschema.validate(json.loads(tok.decode(out)), SCHEMA)
            ok += 1
        except (ValueError, jsonschema.ValidationError):
            invalid += ended
    return {
        "setup_s": setup,
        "compile_s": compile_s,
        "mask_us": 1e6 * (masked - plain) / max(1, steps),
        "correct": f"{ok}/{runs}",
        "invalid": invalid,
        "ok": ok,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("--big-vocab", type=int, default=32000)
    args = p.parse_args()
    from tests.fakes.tiny_llama import build_tiny_tokenizer

    tokenizers = [("tiny BPE", build_tiny_tokenizer())]
    t0 = time.perf_counter()
    big = big_tokenizer(args.big_vocab)
    print(f"(trained a {len(big)}-token BPE on the stdlib in {time.perf_counter() - t0:.1f} s)")
    tokenizers.append((f"{len(big) // 1000}k BPE", big))
    libs: list[Lib] = [XGrammar(), LLGuidance(), FormatEnforcer()]
    print(
        f"{'tokenizer':10} {'library':20} {'setup s':>8} {'compile s':>9} {'mask us/tok':>11} {'valid':>7} {'invalid':>7}"
    )
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for tname, tok in tokenizers:
        for lib in libs:
            try:
                r = run_lib(lib, tok, len(tok), args.runs, args.max_tokens)
            except Exception as exc:  # a library that cannot do it is a result too
                print(f"{tname:10} {lib.name:20} failed: {type(exc).__name__}: {exc}"[:200])
                continue
            results[(tname, lib.name)] = r
            print(
                f"{tname:10} {lib.name:20} {r['setup_s']:8.3f} {r['compile_s']:9.4f} "
                f"{r['mask_us']:11.1f} {r['correct']:>7} {r['invalid']:>7}"
            )
    big_name = tokenizers[-1][0]
    xg = results.get((big_name, "xgrammar"))
    for lib in libs[1:]:
        other = results.get((big_name, lib.name))
        if xg and other:
            print(
                f"{big_name}: mask overhead {lib.name}/xgrammar = "
                f"{other['mask_us'] / max(xg['mask_us'], 1e-9):.2f}"
            )


if __name__ == "__main__":
    main()
