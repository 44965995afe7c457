"""Choosing the expert: embedding kNN over each expert's routing samples.

A ``RoutingIndex`` is an immutable snapshot (faiss ``IndexFlatIP`` over unit vectors, so
inner product = cosine); the ``Router`` swaps in a new snapshot when an expert is added or
replaced, so a request routes on the old index or the new one, never on half of one.

Rules (``bench/router_bench.py`` measures them; docs/router.md has the figures):

- ``mean`` (the original's): for each expert, the mean distance of the query's ``k``
  nearest samples of that expert (k = min(k, samples)); the lowest wins. On unit vectors
  the squared L2 distance is 2 - 2·cos, so this is the highest mean cosine.
- ``vote``: the ``k`` nearest samples over all experts vote for their expert, each with
  weight exp((cos - cos_best) / temperature); the largest total wins.
- ``centroid``: the expert whose normalised mean sample is nearest.
- ``hybrid``: the mean of the centroid's cosine and the ``mean`` rule's score.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from airoboros.contracts import AdapterPublished
from airoboros.ports import Embedder, Vectors
from airoboros.router.package import ExpertSource, Reader, parse_routing_jsonl
from airoboros.router.settings import RoutingRule

log = logging.getLogger(__name__)

RULES: tuple[RoutingRule, ...] = ("centroid", "mean", "vote", "hybrid")
#: the system prompt the trainer puts before instructions that have none (the original's)
DEFAULT_SYSTEM = "A chat."
_USER_TURN = re.compile(r"(?:^|\n)\s*USER:\s*", re.IGNORECASE)
_ASSISTANT_TURN = re.compile(r"\n\s*ASSISTANT:", re.IGNORECASE)


# --- the text a request is routed on --------------------------------------------------------


def content_text(content: Any) -> str:
    """A message's text: a string, or the text parts of an OpenAI content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            str(p.get("text", ""))
            for p in content
            if isinstance(p, Mapping) and p.get("type") in ("text", "input_text")
        ]
        return " ".join(p for p in parts if p)
    return ""


def clip(text: str, max_chars: int) -> str:
    """At most ``max_chars``: the head and the tail (a contextual prompt's instruction is at
    its end), so a long paste does not multiply the embedding's cost."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return f"{text[:half]} … {text[-half:]}"


def chat_routing_text(messages: Sequence[Mapping[str, Any]], max_chars: int = 2000) -> str:
    """The system prompt and the last user turn, as the routing samples are written
    (``system + " " + instruction``). Earlier turns are left out: a long history would
    dilute what the user asks now."""
    system = DEFAULT_SYSTEM
    if messages and messages[0].get("role") in ("system", "developer"):
        system = content_text(messages[0].get("content")).strip() or DEFAULT_SYSTEM
    last_user = ""
    for m in reversed(messages):
        if m.get("role") == "user":
            last_user = content_text(m.get("content")).strip()
            break
    return f"{system} {clip(last_user, max_chars)}".strip()


def prompt_routing_text(prompt: str, max_chars: int = 2000) -> str:
    """For a completions prompt: an airoboros-format prompt (``system\\nUSER: ...\\n
    ASSISTANT:``) routes on its system line and last USER turn, anything else on itself."""
    turns = _USER_TURN.split(prompt)
    if len(turns) < 2:
        return clip(prompt.strip(), max_chars)
    system = turns[0].strip() or DEFAULT_SYSTEM
    last = _ASSISTANT_TURN.split(turns[-1])[0].strip()
    return f"{system} {clip(last, max_chars)}".strip()


# --- the index --------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexedExpert:
    name: str
    description: str
    #: [n, dim] unit vectors of the (sampled) routing samples; n may be 0
    vectors: Vectors
    #: where the expert came from (package, event), for logs
    origin: str = ""
    #: hash of the sampled texts the vectors were made from (unchanged: nothing to embed)
    digest: str = ""


@dataclass(frozen=True)
class RoutingDecision:
    expert: str
    #: how it was chosen: explicit, vote, mean, centroid, agent, default
    method: str
    #: seconds spent choosing (embedding + search, or the agent call)
    seconds: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)


class RoutingIndex:
    """Immutable: built once from the experts, then only searched (thread-safe)."""

    def __init__(
        self,
        experts: Mapping[str, IndexedExpert],
        *,
        k: int = 20,
        temperature: float = 0.05,
        dim: int | None = None,
    ) -> None:
        import faiss

        self.experts: dict[str, IndexedExpert] = dict(experts)
        self.k = k
        self.temperature = temperature
        #: experts with routing samples, in index order
        self.routable: list[str] = [n for n, e in self.experts.items() if len(e.vectors)]
        dims = {e.vectors.shape[1] for e in self.experts.values() if len(e.vectors)}
        if len(dims) > 1:
            raise ValueError(f"routing vectors of different widths: {sorted(dims)}")
        self.dim = dims.pop() if dims else (dim or 0)
        self._per_expert: list[Any] = []
        labels: list[npt.NDArray[np.int64]] = []
        centroids = np.zeros((len(self.routable), max(self.dim, 1)), dtype=np.float32)
        for i, name in enumerate(self.routable):
            vecs = np.ascontiguousarray(self.experts[name].vectors, dtype=np.float32)
            index = faiss.IndexFlatIP(self.dim)
            index.add(vecs)
            self._per_expert.append(index)
            labels.append(np.full(len(vecs), i, dtype=np.int64))
            c = vecs.mean(axis=0)
            centroids[i] = c / max(float(np.linalg.norm(c)), 1e-12)
        self._centroids = centroids
        self._labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        self._global = faiss.IndexFlatIP(max(self.dim, 1))
        if self.routable:
            self._global.add(
                np.ascontiguousarray(
                    np.concatenate([self.experts[n].vectors for n in self.routable]),
                    dtype=np.float32,
                )
            )

    def __len__(self) -> int:
        return len(self.experts)

    def scores(self, queries: Vectors, rule: RoutingRule = "centroid") -> npt.NDArray[np.float32]:
        """[m, E] scores of each query (unit vectors, [m, dim]) for each routable expert
        (``self.routable`` order); higher is better under every rule."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        m, n_exp = len(q), len(self.routable)
        if n_exp == 0:
            return np.zeros((m, 0), dtype=np.float32)
        if rule == "centroid":
            out: npt.NDArray[np.float32] = q @ self._centroids.T
            return out
        if rule in ("mean", "hybrid"):
            out = np.empty((m, n_exp), dtype=np.float32)
            for i, index in enumerate(self._per_expert):
                sims, _ = index.search(q, min(self.k, index.ntotal))
                out[:, i] = sims.mean(axis=1)
            if rule == "hybrid":
                out = 0.5 * out + 0.5 * (q @ self._centroids.T)
            return out
        if rule == "vote":
            sims, ids = self._global.search(q, min(self.k, self._global.ntotal))
            # exp((s - s_best)/T): neighbours far behind the nearest one count for little,
            # so a big expert's crowd of mediocre matches does not outvote a close match.
            weights = np.exp((sims - sims[:, :1]) / self.temperature).astype(np.float32)
            out = np.zeros((m, n_exp), dtype=np.float32)
            rows = np.repeat(np.arange(m), ids.shape[1])
            np.add.at(out, (rows, self._labels[ids.ravel()]), weights.ravel())
            return out
        raise ValueError(f"unknown routing rule {rule!r}; known: {', '.join(RULES)}")

    def choose(
        self, query: Vectors, rule: RoutingRule = "centroid"
    ) -> tuple[str | None, dict[str, float]]:
        """The best expert for one query ([1, dim] or [dim]) and every expert's score;
        None when no expert has routing samples."""
        s = self.scores(query.reshape(1, -1), rule)[0]
        if not len(s):
            return None, {}
        return self.routable[int(np.argmax(s))], {
            n: float(v) for n, v in zip(self.routable, s, strict=True)
        }


# --- embedding requests in batches ------------------------------------------------------------


class EmbedBatcher:
    """Embeds routing texts off the event loop; texts that arrive while a batch is being
    embedded go together in the next one (one forward pass for many requests)."""

    def __init__(self, embedder: Embedder, max_batch: int = 32) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
        self._pending: list[tuple[str, asyncio.Future[Vectors]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def embed(self, text: str) -> Vectors:
        """[dim] unit vector of ``text``."""
        fut: asyncio.Future[Vectors] = asyncio.get_running_loop().create_future()
        self._pending.append((text, fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run())
        return await fut

    async def _run(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            try:
                vecs = await asyncio.to_thread(self.embedder.embed, [t for t, _ in batch])
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for i, (_, fut) in enumerate(batch):
                if not fut.done():
                    fut.set_result(vecs[i])


# --- the router -------------------------------------------------------------------------------


def sample(texts: Sequence[str], max_samples: int, seed: int, expert: str) -> list[str]:
    """At most ``max_samples`` of ``texts``, drawn with a generator seeded by (seed, expert):
    the same package gives the same index on every replica and every restart."""
    unique = list(dict.fromkeys(texts))
    if len(unique) <= max_samples:
        return unique
    return random.Random(f"{seed}:{expert}").sample(unique, max_samples)


class Router:
    """The routing index and its updates. ``route`` is safe to call concurrently with
    updates: it reads one snapshot."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        k: int = 20,
        max_samples: int = 1000,
        rule: RoutingRule = "centroid",
        temperature: float = 0.05,
        seed: int = 42,
        reader: Reader | None = None,
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown routing rule {rule!r}; known: {', '.join(RULES)}")
        self.embedder = embedder
        self.k = k
        self.max_samples = max_samples
        self.rule: RoutingRule = rule
        self.temperature = temperature
        self.seed = seed
        self.reader = reader or Reader()
        self.batcher = EmbedBatcher(embedder)
        self._index = RoutingIndex({}, k=k, temperature=temperature)
        self._update = asyncio.Lock()

    @property
    def index(self) -> RoutingIndex:
        return self._index

    def experts(self) -> list[str]:
        return list(self._index.experts)

    def descriptions(self) -> dict[str, str]:
        return {n: e.description for n, e in self._index.experts.items()}

    def has(self, name: str) -> bool:
        return name in self._index.experts

    # --- building ---------------------------------------------------------------------------

    def _embed(self, texts: list[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        return np.ascontiguousarray(self.embedder.embed(texts), dtype=np.float32)

    async def set_experts(self, sources: Iterable[ExpertSource], *, origin: str = "") -> None:
        """Add or replace experts, then swap in the new index at once. Embedding runs in a
        worker thread; requests keep routing on the previous index meanwhile. An expert
        whose sampled texts and description are unchanged costs nothing (a redelivered
        event, a rescan)."""
        built: list[IndexedExpert] = []
        for src in sources:
            texts = sample(src.samples, self.max_samples, self.seed, src.name)
            digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
            old = self._index.experts.get(src.name)
            if old is not None and old.digest == digest:
                if old.description == src.description:
                    continue
                vecs = old.vectors
            else:
                vecs = await asyncio.to_thread(self._embed, texts)
            built.append(IndexedExpert(src.name, src.description, vecs, origin, digest))
        if not built:
            return
        async with self._update:
            experts = dict(self._index.experts)
            for e in built:
                experts[e.name] = e
            self._index = await asyncio.to_thread(
                RoutingIndex,
                experts,
                k=self.k,
                temperature=self.temperature,
                dim=self.embedder.dim,
            )
        log.info(
            "routing index: %s (%s)",
            ", ".join(f"{e.name}={len(e.vectors)}" for e in built),
            origin or "direct",
        )

    async def load_package(self, location: str) -> list[str]:
        """Add every expert of the LMoE package at ``location`` (path, file:// or
        s3://bucket/prefix); returns their names."""
        sources = await self.reader.package(location)
        await self.set_experts(sources, origin=location)
        return [s.name for s in sources]

    async def on_adapter_published(self, msg: AdapterPublished) -> None:
        """Make ``msg.expert`` routable (or re-read its samples): load the routing file at
        ``msg.routing_uri`` (s3://, file:// or a local path) and rebuild the index.
        Idempotent: a redelivered event rebuilds the same index."""
        samples = parse_routing_jsonl(
            await self.reader.read(msg.routing_uri), origin=msg.routing_uri
        )
        description = msg.description.strip()
        if not description and msg.uri:
            description = await self.reader.read_text(f"{msg.uri.rstrip('/')}/description.txt")
        await self.set_experts(
            [ExpertSource(msg.expert, description, tuple(samples))],
            origin=f"adapter.published {msg.expert} {msg.version}",
        )

    # --- routing ----------------------------------------------------------------------------

    async def route(self, text: str, rule: RoutingRule | None = None) -> RoutingDecision | None:
        """The expert for ``text`` by the embedding rule; None when no expert has routing
        samples."""
        index = self._index
        if not index.routable:
            return None
        start = time.perf_counter()
        vec = await self.batcher.embed(text)
        use = rule or self.rule
        expert, scores = index.choose(vec, use)
        if expert is None:
            return None
        return RoutingDecision(expert, use, time.perf_counter() - start, scores)
