"""Embedding precision: bfloat16 must agree with float32 closely enough for dedupe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from airoboros.embeddings import (
    SentenceTransformerEmbedder,
    l2_threshold_to_cosine,
    native_bf16,
    resolve_dtype,
)
from airoboros.errors import ConfigError

ALPACA = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca_5000.json"


def _texts(n: int) -> list[str]:
    if ALPACA.exists():
        rows = json.loads(ALPACA.read_text(encoding="utf-8"))[:n]
        return [r["instruction"] + ("\n" + r["input"] if r.get("input") else "") for r in rows]
    # A clean clone without the handbook beside it still checks something real.
    base = ["How do I bake a chocolate cake?", "Explain the French Revolution.", "Sort a list."]
    return [f"{t} (variant {i})" for i in range(n // 3) for t in base]


def test_dtype_choice() -> None:
    assert resolve_dtype("float32", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if native_bf16("cpu") else "float32")
    assert resolve_dtype("auto", "mps") == "float32"
    with pytest.raises(ConfigError, match="embedding_dtype: 'float8'"):
        resolve_dtype("float8", "cpu")


def test_bfloat16_embeddings_match_float32() -> None:
    texts = _texts(300)
    fp32 = SentenceTransformerEmbedder(dtype="float32")
    bf16 = SentenceTransformerEmbedder(dtype="bfloat16")
    a, b = fp32.embed(texts), bf16.embed(texts)
    assert a.dtype == b.dtype == np.float32
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-4)
    cos = (a * b).sum(axis=1)
    assert cos.min() >= 0.99, cos.min()
    # The dedupe decision (nearest earlier text at or above the default threshold)
    # flips for at most a handful of the borderline pairs.
    threshold = l2_threshold_to_cosine(0.35)
    sims_a, sims_b = np.triu(a @ a.T, 1), np.triu(b @ b.T, 1)
    dup_a, dup_b = (sims_a >= threshold).any(axis=0), (sims_b >= threshold).any(axis=0)
    assert dup_a.sum() > 0
    assert (dup_a != dup_b).sum() <= max(1, dup_a.sum() // 10)
