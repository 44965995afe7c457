"""The quality report (airoboros.report): its text and vector measures on hand-made sets,
the projection arithmetic, and the report built from a store with known rows and counters,
on SQLite and (when one answers on 127.0.0.1:5432) PostgreSQL."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from airoboros.contracts import BatchStats, Item
from airoboros.errors import NotFoundError
from airoboros.protocol import JobReport
from airoboros.report import (
    Pace,
    build_report,
    compression_ratio,
    cost_to_finish,
    distinct_n,
    eta_seconds,
    format_duration,
    mean_nn_cosine,
    report_table,
)
from airoboros.store import Store
from tests.contract import test_store_contract as contract

# The store contract's backends: SQLite, and PostgreSQL when one answers.
pg_database, url, store = contract.pg_database, contract.url, contract.store

VARIED = [
    "Explain how tides are caused by the moon.",
    "Write a haiku about a rusty bicycle.",
    "List three uses of baking soda in cleaning.",
    "What year did the Berlin Wall fall?",
    "Translate 'good morning' into Portuguese.",
    "Describe the rules of chess castling briefly.",
]
SAME = ["Write a short poem about the sea."] * 6


# --- text and vector measures ---------------------------------------------------------------


def test_distinct_n_counts_distinct_ngrams_over_all() -> None:
    # "a b a" + "b c": unigrams a b a b c (3 distinct of 5), bigrams ab ba bc (3 of 3)
    assert distinct_n(["A b a", "b, c"], 1) == pytest.approx(3 / 5)
    assert distinct_n(["A b a", "b, c"], 2) == pytest.approx(3 / 3)
    assert distinct_n([], 1) is None
    assert distinct_n(["one"], 2) is None  # no bigram at all


def test_identical_instructions_score_low_distinct_and_high_compression() -> None:
    same_d2 = distinct_n(SAME, 2)
    varied_d2 = distinct_n(VARIED, 2)
    assert same_d2 == pytest.approx(1 / 6)  # 6 bigrams, each repeated 6 times
    assert varied_d2 == pytest.approx(1.0)
    same_cr, varied_cr = compression_ratio(SAME), compression_ratio(VARIED)
    assert same_cr is not None and varied_cr is not None
    assert same_cr > 3.0 > varied_cr
    assert compression_ratio([]) is None


def test_mean_nearest_neighbour_cosine_on_known_vectors() -> None:
    # a and b at 60 degrees (cos 0.5); c orthogonal to both: NNs are b, a, and 0 for c
    a = [1.0, 0.0, 0.0]
    b = [0.5, np.sqrt(3) / 2, 0.0]
    c = [0.0, 0.0, 2.0]  # not unit: normalised first
    value, used = mean_nn_cosine(np.array([a, b, c]))
    assert used == 3
    assert value == pytest.approx((0.5 + 0.5 + 0.0) / 3, abs=1e-6)
    # a vector and its duplicate: each one's nearest other is the copy, never itself
    value, _ = mean_nn_cosine(np.array([a, a]))
    assert value == pytest.approx(1.0)
    assert mean_nn_cosine(np.array([a])) == (None, 0)
    assert mean_nn_cosine(np.zeros((0, 0))) == (None, 0)


def test_nearest_neighbour_cosine_samples_queries_of_a_large_index() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(size=(600, 8)).astype(np.float32)
    full, n_full = mean_nn_cosine(v, sample=10_000)
    part, n_part = mean_nn_cosine(v, sample=200, seed=3)
    assert (n_full, n_part) == (600, 200)
    assert full is not None and part is not None
    assert abs(full - part) < 0.05  # a sample of queries estimates the mean
    assert mean_nn_cosine(v, sample=200, seed=3) == (part, 200)  # seeded: repeatable


# --- projection -----------------------------------------------------------------------------


def test_cost_to_finish_and_eta_arithmetic() -> None:
    # 10 of 40 kept for $0.50: $0.05 a row, 30 missing
    assert cost_to_finish(40, 10, 0.5) == pytest.approx(1.5)
    assert cost_to_finish(40, 40, 2.0) == 0.0
    assert cost_to_finish(40, 0, 0.3) is None  # no rate yet
    # 2 rows a second, 30 missing
    assert eta_seconds(40, 10, 2.0) == pytest.approx(15.0)
    assert eta_seconds(40, 40, None) == 0.0
    assert eta_seconds(40, 10, None) is None
    assert [format_duration(s) for s in (None, 15.2, 125, 7260)] == ["?", "15s", "2m05s", "2h01m"]


def test_pace_counts_only_rows_kept_since_the_first_look() -> None:
    now = [100.0]
    pace = Pace(clock=lambda: now[0])
    assert pace.rate("general", 50) is None  # 50 kept by an earlier run: not this run's pace
    now[0] = 110.0
    assert pace.rate("general", 50) is None
    now[0] = 120.0
    assert pace.rate("general", 90) == pytest.approx(2.0)  # 40 rows in 20 s
    assert eta_seconds(100, 90, pace.rate("general", 90)) == pytest.approx(5.0)


def test_the_live_table_projects_cost_and_eta_per_category_and_for_the_job() -> None:
    from airoboros.cli.progress import project

    def row(name: str, accepted: int, target: int, cost: float, state: str = "running"):
        return {"name": name, "accepted": accepted, "target": target, "cost": cost, "state": state}

    now = [0.0]
    pace = Pace(clock=lambda: now[0])
    first = [row("general", 0, 20, 0.0), row("joke", 2, 10, 0.1), row("old", 5, 5, 1.0, "done")]
    assert project(first, pace) == (None, None)  # no rate yet
    assert first[1]["to_finish"] == pytest.approx(0.4)  # 8 missing at $0.05
    assert first[1]["eta"] is None
    now[0] = 10.0
    # general: 5 kept in 10 s at $0.02 each, 15 to go; joke: 4 more in 10 s, 4 to go
    rows = [row("general", 5, 20, 0.1), row("joke", 6, 10, 0.3), row("old", 5, 5, 1.0, "done")]
    cost_left, eta = project(rows, pace)
    assert rows[0]["to_finish"] == pytest.approx(0.3) and rows[0]["eta"] == pytest.approx(30.0)
    assert rows[1]["to_finish"] == pytest.approx(0.2) and rows[1]["eta"] == pytest.approx(10.0)
    assert rows[2]["to_finish"] is None and rows[2]["eta"] is None
    assert cost_left == pytest.approx(0.5)
    assert eta == pytest.approx(30.0)  # categories run side by side: the slowest one
    now[0] = 20.0
    # joke kept nothing more: 4 rows in 20 s now; a category that kept nothing yet
    rows = [row("general", 5, 20, 0.1), row("joke", 6, 10, 0.3), row("new", 0, 3, 0.0)]
    cost_left, eta = project(rows, pace)
    assert rows[1]["eta"] == pytest.approx(20.0)
    assert (cost_left, eta) == (None, None)  # "new" has neither a cost nor a rate yet


# --- the report from a store ----------------------------------------------------------------


def rows(n: int, category: str, texts: list[str] | None = None) -> list[Item]:
    texts = texts or [f"{category} question number {i}" for i in range(n)]
    return [
        Item(instruction=t, response=f"answer {i}", category=category) for i, t in enumerate(texts)
    ]


async def commit(
    store: Store, instructor: str, items: list[Item], stats: BatchStats, job_id: str = "j"
) -> None:
    await store.rows.apply_batch(
        job_id,
        message_id=uuid.uuid4().hex,
        task_id=uuid.uuid4().hex,
        instructor=instructor,
        items=items,
        stats=stats,
    )


async def test_report_from_a_store_with_known_rows_and_counters(store: Store) -> None:
    await store.jobs.ensure(
        "j", config={"model": "m"}, targets={"general": 6, "coding": 4, "character": 2}
    )
    # general: a batch that kept its 6 varied rows ...
    await commit(
        store,
        "general",
        rows(6, "general", VARIED),
        BatchStats(
            asked=10, proposed=8, duplicates=2, filtered=1, refused=1, unparseable=0,
            requests=2, prompt_tokens=300, completion_tokens=700, cost=0.6,
        ),
    )  # fmt: skip
    # ... and a batch of duplicates only: its tokens bought nothing
    await commit(
        store,
        "general",
        [],
        BatchStats(asked=4, proposed=3, duplicates=3, requests=1, prompt_tokens=50,
                   completion_tokens=150, cost=0.06),
    )  # fmt: skip
    # coding: 2 of 4 kept, the same instruction twice; one reply unparseable
    await commit(
        store,
        "coding",
        rows(2, "coding", ["Write a Python function to sort a list."] * 2),
        BatchStats(asked=4, proposed=2, unparseable=1, requests=2, prompt_tokens=100,
                   completion_tokens=100, cost=0.2),
    )  # fmt: skip
    # topic generation: usage outside batches
    await store.progress.add_stats("j", "topics", requests=1, prompt_tokens=10, cost=0.04)
    # the job's dedupe index ("dataset" scope), keyed by instructor: general's two at 60
    # degrees (NN cosine 0.5 each), coding's one orthogonal to both; the index's NN
    # cosines: 0.5, 0.5, 0
    a, b, c = [1.0, 0.0, 0.0], [0.5, np.sqrt(3) / 2, 0.0], [0.0, 0.0, 1.0]
    await store.vectors.add(
        "j", ["general:a", "general:b", "coding:c"], np.array([a, b, c], dtype=np.float32)
    )
    # character's own index: two identical vectors
    await store.vectors.add("j:character", ["x", "y"], np.array([a, a], dtype=np.float32))

    report = await build_report(store, "j")
    by = {r.category: r for r in report.categories}
    assert sorted(by) == ["character", "coding", "general", "topics"]

    g = by["general"]
    assert (g.target, g.kept, g.rows) == (6, 6, 6)
    assert (g.proposed, g.duplicates, g.filtered, g.refused, g.unparseable) == (11, 5, 1, 1, 0)
    assert g.dedupe_yield == pytest.approx(6 / 11, abs=1e-4)
    assert g.cost == pytest.approx(0.66)
    assert g.cost_per_kept == pytest.approx(0.11)
    assert g.cost_to_finish == 0.0
    assert g.wasted_tokens == 200  # the duplicates-only batch
    assert g.diversity.instructions == 6
    assert g.diversity.distinct_2 == pytest.approx(1.0)
    assert g.diversity.nn_scope == "category" and g.diversity.nn_sampled == 2
    assert g.diversity.nn_cosine == pytest.approx(0.5, abs=1e-4)

    k = by["coding"]
    assert (k.kept, k.rows, k.proposed, k.unparseable, k.duplicates) == (2, 2, 2, 1, 0)
    assert k.dedupe_yield == 1.0
    assert k.cost_per_kept == pytest.approx(0.1)
    assert k.cost_to_finish == pytest.approx(0.2)  # 2 missing at $0.10
    assert k.diversity.distinct_2 == pytest.approx(0.5)  # the same bigrams twice
    assert k.diversity.compression_ratio is not None
    # one vector of its own: the whole index's figure, said so
    assert k.diversity.nn_scope == "job" and k.diversity.nn_sampled == 3
    assert k.diversity.nn_cosine == pytest.approx(1 / 3, abs=1e-4)

    ch = by["character"]
    assert (ch.kept, ch.rows, ch.cost_per_kept, ch.cost_to_finish) == (0, 0, None, None)
    assert ch.dedupe_yield is None
    assert ch.diversity.instructions == 0 and ch.diversity.distinct_1 is None
    assert ch.diversity.nn_scope == "category"
    assert ch.diversity.nn_cosine == pytest.approx(1.0)

    t = by["topics"]
    assert (t.target, t.kept, t.requests) == (0, 0, 1)
    assert t.cost == pytest.approx(0.04)
    assert t.diversity.nn_scope is None

    tot = report.totals
    assert (tot.target, tot.kept, tot.rows, tot.duplicates, tot.proposed) == (12, 8, 8, 5, 13)
    assert tot.requests == 6
    assert tot.cost == pytest.approx(0.9)
    assert tot.cost_per_kept == pytest.approx(0.9 / 8)
    assert tot.cost_to_finish is None  # character has no rate yet
    assert tot.wasted_tokens == 200
    assert tot.diversity.instructions == 8
    assert tot.diversity.nn_scope == "job"
    assert tot.diversity.nn_cosine == pytest.approx(1 / 3, abs=1e-4)
    assert report.status == "running" and report.job_id == "j"

    # the report is a typed body: it round-trips through JSON
    assert JobReport.model_validate_json(report.model_dump_json()) == report
    table = report_table(report)
    assert table[0].split()[:3] == ["category", "kept", "proposed"]
    assert any(line.split()[:2] == ["general", "6/6"] for line in table)
    assert table[-1].split()[:2] == ["(job)", "8/12"]


async def test_a_large_category_is_measured_on_a_sample(store: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 30})
    texts = [f"instruction {i} about topic {i * 7}" for i in range(30)]
    await commit(store, "general", rows(30, "general", texts), BatchStats(proposed=30))
    report = await build_report(store, "j", text_sample=10)
    g = report.categories[0]
    assert (g.kept, g.rows, g.diversity.instructions) == (30, 30, 10)


async def test_no_report_for_an_unknown_job(store: Store) -> None:
    with pytest.raises(NotFoundError):
        await build_report(store, "nope")
