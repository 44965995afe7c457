"""The quality report of a job: per category, where its items went, what a kept row cost,
how varied the kept instructions are; and the projection of the cost (and time) to finish
that the live progress table shows.

One builder, ``build_report``, reads only the store's ports (counters from
``instructor_stats``, rows, the dedupe vectors), so the topics API
(``GET /v1/jobs/{id}/report``), the CLI's summary and the embedded run's
``<output>.report.json`` are the same figures on SQLite and PostgreSQL.

Diversity, on the instructions of the kept rows (a random sample of ``text_sample`` per
category when there are more):

- distinct-n (Li et al., 2016): distinct word n-grams over all n-grams, n = 1 and 2;
- compression ratio: bytes over zlib-compressed bytes (the measure of Shaib et al., 2024,
  that the ``diversity`` package computes with gzip; zlib is the same DEFLATE without its
  header, from the standard library). It was chosen over self-BLEU: it is linear in the
  text, needs no sample or smoothing choice, and ranks sets as self-BLEU does;
- mean nearest-neighbour cosine: for each of the category's vectors in the dedupe index it
  is screened against (``VectorRepository``; every instruction dedupe accepted, keyed by
  instructor), its cosine to the nearest other one of the category, averaged over a
  random sample of ``nn_sample`` queries; the job's figure is over the whole job index.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from airoboros.catalog import known_instructors, spec
from airoboros.counting import CategoryCounts
from airoboros.protocol import CategoryReport, Diversity, JobReport, ReportTotals

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from airoboros.store.ports import Store

#: instructions per category that the text measures read (a random sample beyond)
TEXT_SAMPLE = 2000
#: query vectors per dedupe index for the nearest-neighbour cosine (a sample beyond)
NN_SAMPLE = 1000
_WORD = re.compile(r"\w+")


# --- diversity of a set of texts ------------------------------------------------------------


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Distinct word n-grams / all word n-grams of ``texts`` (n-grams do not cross from
    one text to the next); None when the texts have no n-gram."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for t in texts:
        w = words(t)
        for i in range(len(w) - n + 1):
            seen.add(tuple(w[i : i + n]))
            total += 1
    return len(seen) / total if total else None


def compression_ratio(texts: Sequence[str]) -> float | None:
    """Bytes of the texts (one per line) over the bytes zlib (level 9) makes of them:
    1 or below for short, varied text, higher the more the texts repeat each other."""
    data = "\n".join(texts).encode()
    if not data:
        return None
    return len(data) / len(zlib.compress(data, 9))


def mean_nn_cosine(
    vectors: npt.ArrayLike, *, sample: int = NN_SAMPLE, seed: int = 0
) -> tuple[float | None, int]:
    """(mean over the queries of the cosine to their nearest OTHER vector, queries used).
    Rows are normalised here; the queries are all rows, or ``sample`` of them drawn
    with ``seed``, each compared with every row. (None, 0) for fewer than two rows."""
    import numpy as np

    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2 or v.shape[0] < 2:
        return None, 0
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    n = v.shape[0]
    if n > sample:
        queries = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
    else:
        queries = np.arange(n)
    total = 0.0
    for start in range(0, len(queries), 256):
        q = queries[start : start + 256]
        sims = v[q] @ v.T  # [len(q), n]
        sims[np.arange(len(q)), q] = -np.inf  # not itself
        total += float(sims.max(axis=1).sum())
    return total / len(queries), len(queries)


def text_diversity(texts: Sequence[str]) -> Diversity:
    return Diversity(
        instructions=len(texts),
        distinct_1=_round(distinct_n(texts, 1)),
        distinct_2=_round(distinct_n(texts, 2)),
        compression_ratio=_round(compression_ratio(texts)),
    )


# --- projection ---------------------------------------------------------------------------


def cost_per_kept(cost: float, kept: int) -> float | None:
    return cost / kept if kept > 0 else None


def cost_to_finish(target: int, kept: int, cost: float) -> float | None:
    """What the rows still missing would cost at the cost per kept row so far (0 when
    the count is reached; None while nothing is kept, as there is no rate yet)."""
    missing = max(0, target - kept)
    if missing == 0:
        return 0.0
    per = cost_per_kept(cost, kept)
    return None if per is None else missing * per


def eta_seconds(target: int, kept: int, rate: float | None) -> float | None:
    """Seconds until the count is reached at ``rate`` kept rows a second (0 when it is
    reached; None without a rate)."""
    missing = max(0, target - kept)
    if missing == 0:
        return 0.0
    if rate is None or rate <= 0:
        return None
    return missing / rate


@dataclass
class Pace:
    """The rate of kept rows per category, as a live display sees the counts go by: kept
    rows since the first look over the time since then (rows kept by an earlier run of
    the job are not counted as made by this one)."""

    clock: Callable[[], float] = time.monotonic
    _first: dict[str, tuple[float, int]] = field(default_factory=dict)

    def rate(self, name: str, kept: int) -> float | None:
        """Kept rows a second of ``name`` so far in this run (None before any)."""
        now = self.clock()
        t0, k0 = self._first.setdefault(name, (now, kept))
        if kept <= k0 or now <= t0:
            return None
        return (kept - k0) / (now - t0)


def format_duration(seconds: float | None) -> str:
    if seconds is None or math.isinf(seconds):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# --- the report ---------------------------------------------------------------------------


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def _yield(kept: int, duplicates: int) -> float | None:
    return _round(kept / (kept + duplicates)) if kept + duplicates > 0 else None


async def _texts(store: Store, job_id: str, category: str, rows: int, n: int) -> list[str]:
    """The instructions of the category's rows: all, or a random ``n`` of them."""
    if rows > n:
        return [s.item.instruction for s in await store.rows.sample(job_id, [category], n)]
    return [s.item.instruction async for s in store.rows.iterate(job_id, category=category)]


def nn_namespace(job_id: str, category: str) -> tuple[str | None, str | None]:
    """(the dedupe index a category is screened against, "category" or "job"); (None,
    None) when it is not screened (or is not an instructor)."""
    if category not in known_instructors():
        return None, None
    scope = spec(category).dedupe_scope
    if scope == "own":
        return f"{job_id}:{category}", "category"
    if scope == "dataset":
        return job_id, "job"
    return None, None


async def build_report(
    store: Store,
    job_id: str,
    *,
    text_sample: int = TEXT_SAMPLE,
    nn_sample: int = NN_SAMPLE,
    seed: int = 0,
) -> JobReport:
    """The quality report of ``job_id`` from the store (NotFoundError for no job).
    Categories are the job's instructors with counters (usage outside batches, such as
    topic generation, is a category with a target of 0) and any category its rows have."""
    job = await store.jobs.get(job_id)
    stats: dict[str, CategoryCounts] = await store.progress.stats(job_id)
    row_counts = await store.rows.count_by_category(job_id)
    names = sorted(set(stats) | set(row_counts))

    loaded: dict[str, tuple[list[str], npt.NDArray[np.float32]]] = {}
    nn_cache: dict[tuple[str, str | None], tuple[float | None, int]] = {}

    async def nn(namespace: str, category: str | None = None) -> tuple[float | None, int]:
        """The index's figure, or (with ``category``) that of the category's own vectors
        in it: dedupe keys them ``<instructor>:<candidate id>``."""
        if namespace not in loaded:
            _, keys, vecs = await store.vectors.load(namespace)
            loaded[namespace] = keys, vecs
        if (namespace, category) not in nn_cache:
            keys, vecs = loaded[namespace]
            if category is not None:
                mine = [i for i, k in enumerate(keys) if k.startswith(f"{category}:")]
                vecs = vecs[mine] if mine else vecs[:0]
            # A large index is seconds of arithmetic: off the event loop (an API serves it).
            nn_cache[namespace, category] = await asyncio.to_thread(
                mean_nn_cosine, vecs, sample=nn_sample, seed=seed
            )
        return nn_cache[namespace, category]

    categories: list[CategoryReport] = []
    all_texts: list[str] = []
    for name in names:
        c = stats.get(name) or CategoryCounts(name)
        rows = row_counts.get(name, 0)
        texts = await _texts(store, job_id, name, rows, text_sample)
        all_texts.extend(texts)
        div = text_diversity(texts)
        namespace, scope = nn_namespace(job_id, name)
        if namespace is not None:
            value, used = await nn(namespace)
            if scope == "job":
                # Its own vectors in the shared index; the whole index's figure when it
                # has fewer than two there (vectors of a job made before they were keyed
                # by instructor, or of rows imported from an existing output).
                own, own_used = await nn(namespace, name)
                if own is not None:
                    value, used, scope = own, own_used, "category"
            div.nn_cosine, div.nn_scope, div.nn_sampled = _round(value), scope, used
        categories.append(
            CategoryReport(
                category=name,
                target=c.target,
                proposed=c.proposed,
                unparseable=c.unparseable,
                filtered=c.filtered,
                refused=c.refused,
                duplicates=c.duplicates,
                withheld=c.withheld,
                dropped=c.dropped,
                kept=c.accepted,
                rows=rows,
                dedupe_yield=_yield(c.accepted, c.duplicates),
                requests=c.requests,
                prompt_tokens=c.prompt_tokens,
                completion_tokens=c.completion_tokens,
                cost=round(c.cost, 6),
                cost_per_kept=_round(cost_per_kept(c.cost, c.accepted), 6),
                wasted_tokens=round(c.wasted_tokens),
                cost_to_finish=_round(cost_to_finish(c.target, c.accepted, c.cost), 6),
                diversity=div,
            )
        )

    def total(key: str) -> int:
        return sum(int(getattr(r, key)) for r in categories)

    kept, cost = total("kept"), sum(r.cost for r in categories)
    finishing = [r.cost_to_finish for r in categories if r.cost_to_finish is not None]
    unknown = len(finishing) < len(categories)
    job_div = text_diversity(all_texts)
    if any(nn_namespace(job_id, r.category)[1] == "job" for r in categories):
        value, used = await nn(job_id)
        job_div.nn_cosine, job_div.nn_scope, job_div.nn_sampled = _round(value), "job", used
    totals = ReportTotals(
        target=total("target"),
        proposed=total("proposed"),
        unparseable=total("unparseable"),
        filtered=total("filtered"),
        refused=total("refused"),
        duplicates=total("duplicates"),
        withheld=total("withheld"),
        dropped=total("dropped"),
        kept=kept,
        rows=total("rows"),
        dedupe_yield=_yield(kept, total("duplicates")),
        requests=total("requests"),
        prompt_tokens=total("prompt_tokens"),
        completion_tokens=total("completion_tokens"),
        cost=round(cost, 6),
        cost_per_kept=_round(cost_per_kept(cost, kept), 6),
        wasted_tokens=total("wasted_tokens"),
        cost_to_finish=None if unknown else round(sum(finishing), 6),
        diversity=job_div,
    )
    return JobReport(
        job_id=job_id,
        status=job.status,
        generated_at=datetime.now(UTC).isoformat(),
        categories=categories,
        totals=totals,
    )


def _fmt(x: float | None, spec_: str) -> str:
    return "-" if x is None else format(x, spec_)


def report_table(report: JobReport) -> list[str]:
    """The per-category table of a report, as text lines (the CLI's summary)."""
    head = (
        f"  {'category':<24} {'kept':>11} {'proposed':>8} {'unparse':>7} {'filter':>6} "
        f"{'refused':>7} {'dup':>5} {'yield':>6} {'dist-2':>6} {'zlib':>5} {'nn cos':>6} "
        f"{'cost':>9} {'$/kept':>9} {'wasted tok':>10}"
    )
    lines = [head]
    every: list[CategoryReport | ReportTotals] = [*report.categories, report.totals]
    for r in every:
        name = r.category if isinstance(r, CategoryReport) else "(job)"
        d = r.diversity
        lines.append(
            f"  {name:<24} {f'{r.kept}/{r.target}':>11} {r.proposed:>8} {r.unparseable:>7} "
            f"{r.filtered:>6} {r.refused:>7} {r.duplicates:>5} "
            f"{_fmt(r.dedupe_yield, '.0%'):>6} {_fmt(d.distinct_2, '.2f'):>6} "
            f"{_fmt(d.compression_ratio, '.2f'):>5} {_fmt(d.nn_cosine, '.3f'):>6} "
            f"{r.cost:>9.4f} {_fmt(r.cost_per_kept, '.5f'):>9} {r.wasted_tokens:>10,}"
        )
    return lines
