"""airoboros.trainer.segment and `airoboros segment-experts`: the category -> expert map,
cross-sampling by the original's rule, routing samples, files, errors and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airoboros.trainer.segment import (
    DEFAULT_EXPERTS,
    NON_ROW_CATEGORIES,
    ORIGINAL_DIVISOR,
    ExpertMap,
    SegmentError,
    cross_sample_size,
    expert_map_from_dict,
    load_expert_map,
    read_rows,
    segment,
    write_segmentation,
)
from tests.e2e.helpers import run_cli

#: The original's map (reference §5.1).
ORIGINAL_MAP = {
    "qa": ["quiz", "multiple_choice", "contextual", "counterfactual_contextual"],
    "creative": [
        "card",
        "writing",
        "experience",
        "song",
        "roleplay",
        "gtkm",
        "rp",
        "detailed_writing",
        "joke",
    ],
    "code": ["coding"],
    "reasoning": ["cot", "theory_of_mind", "riddle", "orca"],
    "function": ["agent", "plan"],
    "general": ["wordgame", "trivia", "general"],
}


def rows_of(sizes: dict[str, int], *, system: str | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for cat, n in sizes.items():
        for i in range(n):
            row: dict[str, Any] = {"instruction": f"{cat} q{i}", "response": f"a{i}"}
            if cat:
                row["category"] = cat
            if system is not None:
                row["system"] = system
            out.append(row)
    return out


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- the map -------------------------------------------------------------------------------


def test_default_map_covers_every_category_the_generator_makes() -> None:
    from airoboros.catalog import CATALOG, known_instructors

    m = load_expert_map(None)
    assert m.names == ["qa", "creative", "code", "reasoning", "function", "general"]
    row_categories = known_instructors() - NON_ROW_CATEGORIES
    assert {c for c in row_categories if m.expert_for(c) is None} == set()
    # the only categories that never become rows are the card-making instructors
    cards = {n for n, s in CATALOG.items() if s.phase == "cards"}
    assert cards == set(NON_ROW_CATEGORIES)


def test_default_map_keeps_the_originals_assignments_and_adds_the_dropped_ones() -> None:
    m = ExpertMap()
    for expert, cats in ORIGINAL_MAP.items():
        for c in cats:
            assert m.expert_for(c) == expert, c
    added = {
        "stylized_response": "creative",
        "misconception": "general",
        "awareness": "general",
        "editor": "general",
        "documents": "qa",
    }
    for c, expert in added.items():
        assert m.expert_for(c) == expert, c
    for e in DEFAULT_EXPERTS:
        assert e.description.strip() and "\n" not in e.description
        assert len(e.description) < 200


def test_yaml_map_replaces_the_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "experts.yaml"
    cfg.write_text(
        "experts:\n"
        "  code:\n"
        "    categories: [coding]\n"
        "  chat:\n"
        "    categories: [general, trivia]\n"
        "    description: Small talk.\n"
        "fallback: chat\n"
        "sampling: {cap: 3, fraction: 0.5, divisor: 2, max_routing_samples: 4, seed: 7}\n",
        encoding="utf-8",
    )
    m = load_expert_map(cfg)
    assert m.names == ["code", "chat"]
    assert m.expert_for("trivia") == "chat"
    assert m.expert_for("joke") is None
    assert m.expert("code").description == ExpertMap().expert("code").description
    assert m.expert("chat").description == "Small talk."
    assert (m.sampling.cap, m.sampling.fraction, m.sampling.divisor) == (3, 0.5, 2.0)
    assert (m.sampling.max_routing_samples, m.sampling.seed) == (4, 7)
    seg = segment(rows_of({"coding": 10, "joke": 2}), m)
    assert seg.counts["chat"].own_by_category == {"joke": 2}
    # the map round-trips through its dict (the summary's "map")
    again = expert_map_from_dict(m.to_dict())
    assert again.experts == m.experts and again.sampling == m.sampling


def test_yaml_without_experts_keeps_the_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "experts.yaml"
    cfg.write_text("unmapped: drop\nsampling:\n  divisor: 5\n", encoding="utf-8")
    m = load_expert_map(cfg)
    assert tuple(m.experts.values()) == DEFAULT_EXPERTS
    assert m.unmapped == "drop" and m.sampling.divisor == 5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("experts:\n  qa: {categories: [trivia]}\n  b: {categories: [trivia], description: x}\n"
         "fallback: qa\n", "'trivia' is already in expert 'qa'"),
        ("experts:\n  mine: {categories: [a]}\nfallback: mine\n", "experts.mine.description"),
        ("experts:\n  qa: {categories: [a]}\n", "fallback: 'general' is not an expert"),
        ("experts:\n  qa: {categories: [a], colour: red}\nfallback: qa\n", "experts.qa.colour"),
        ("experts:\n  'a/b': {categories: [a], description: x}\nunmapped: drop\n", "experts.a/b"),
        ("expert: {}\n", "expert: Extra inputs"),
        ("unmapped: keep\n", "unmapped"),
        ("sampling: {fraction: 2}\n", "sampling.fraction"),
        ("sampling: {cap: 0, divisor: 0}\n", "2 problems"),
        ("experts: [qa]\n", "experts"),
        ("- a\n- b\n", "must be a mapping"),
        ("experts: {qa: [\n", "not valid YAML"),
    ],
)  # fmt: skip
def test_bad_experts_config_is_one_line_naming_the_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    cfg = tmp_path / "experts.yaml"
    cfg.write_text(text, encoding="utf-8")
    with pytest.raises(SegmentError) as exc:
        load_expert_map(cfg)
    message = str(exc.value)
    assert expected in message and "\n" not in message
    assert str(cfg) in message


def test_missing_experts_config(tmp_path: Path) -> None:
    with pytest.raises(SegmentError, match="experts config not found"):
        load_expert_map(tmp_path / "nope.yaml")


# --- cross-sampling ------------------------------------------------------------------------


def test_cross_sample_size_follows_the_rule() -> None:
    assert cross_sample_size(0, 500, 0.1) == 0  # the original raised ValueError
    assert cross_sample_size(1, 500, 0.1) == 1
    assert cross_sample_size(9, 500, 0.1) == 1  # int(0.9) == 0 -> "or 1"
    assert cross_sample_size(40, 500, 0.1) == 4
    assert cross_sample_size(7000, 500, 0.1) == 500
    assert cross_sample_size(7000, 100, 0.5) == 100
    assert pytest.approx(22 * 0.6) == ORIGINAL_DIVISOR


SIZES = {
    "coding": 5300,  # 10% is 530: capped at 500
    "trivia": 40,
    "wordgame": 3,  # "or 1"
    "contextual": 260,
    "joke": 120,
    "riddle": 75,
    "plan": 14,
    "agent": 0,  # mapped, but no rows: must not crash
}


def expected_counts(
    sizes: dict[str, int], m: ExpertMap, cap: int, fraction: float, divisor: float
) -> dict[str, tuple[int, int, dict[str, int]]]:
    sample = {c: min(cap, int(fraction * n)) or 1 for c, n in sizes.items() if n}
    out = {}
    for e in m.experts.values():
        own = sum(sizes.get(c, 0) for c in e.categories)
        k = int(own / divisor)
        cross = {
            c: min(sample[c], k)
            for other in m.experts.values()
            if other.name != e.name
            for c in other.categories
            if c in sample and min(sample[c], k)
        }
        out[e.name] = (own, sum(cross.values()), cross)
    return out


@pytest.mark.parametrize(
    ("cap", "fraction", "divisor"), [(500, 0.1, ORIGINAL_DIVISOR), (10, 0.3, 1.0), (500, 1.0, 2.5)]
)
def test_cross_sampling_counts_follow_the_rule_exactly(
    cap: int, fraction: float, divisor: float
) -> None:
    rows = rows_of(SIZES)
    m = ExpertMap()
    seg = segment(rows, m, cap=cap, fraction=fraction, divisor=divisor)
    assert (seg.sampling.cap, seg.sampling.fraction, seg.sampling.divisor) == (
        cap,
        fraction,
        divisor,
    )
    expected = expected_counts(SIZES, m, cap, fraction, divisor)
    by_category: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_category.setdefault(r["category"], []).append(r)
    for name, (own, cross, cross_by_category) in expected.items():
        c = seg.counts[name]
        assert (c.own, c.cross, c.cross_by_category) == (own, cross, cross_by_category), name
        training = seg.training[name]
        assert len(training) == own + cross
        # own rows first, category by category in the map's order, each in input order
        own_rows = [r for cat in m.expert(name).categories for r in by_category.get(cat, [])]
        assert training[:own] == own_rows
        extra = training[own:]
        for cat, n in cross_by_category.items():
            picked = [r for r in extra if r["category"] == cat]
            assert len(picked) == n
            assert len({r["instruction"] for r in picked}) == n  # no row twice
            assert all(r in by_category[cat] for r in picked)
    # the same rows of a category go to every expert that takes that many
    code_sample = [r for r in seg.training["qa"] if r["category"] == "coding"]
    general_sample = [r for r in seg.training["general"] if r["category"] == "coding"]
    shorter = min(len(code_sample), len(general_sample))
    assert code_sample[:shorter] == general_sample[:shorter]
    assert seg.total_rows == len(rows)
    assert seg.warnings == []


def test_original_numbers_on_the_default_parameters() -> None:
    seg = segment(rows_of(SIZES))
    # qa owns 260 rows: int(260 / 13.2) = 19 from each other category's sample
    assert seg.counts["qa"].cross_by_category == {
        "joke": 12,
        "coding": 19,
        "riddle": 7,
        "plan": 1,
        "wordgame": 1,
        "trivia": 4,
    }
    # code owns 5300: int(5300 / 13.2) = 401, so every other sample is taken whole
    assert seg.counts["code"].cross == 26 + 12 + 7 + 1 + 4 + 1


def test_seed_reproducibility_and_samples_independent_of_other_categories(
    tmp_path: Path,
) -> None:
    rows = rows_of(SIZES)
    a, b = segment(rows, seed=3), segment(rows, seed=3)
    assert a.training == b.training and a.routing == b.routing
    c = segment(rows, seed=4)
    assert c.training != a.training
    assert c.counts["qa"].cross == a.counts["qa"].cross
    write_segmentation(a, tmp_path / "a")
    write_segmentation(b, tmp_path / "b")
    for f in [*sorted((tmp_path / "a").rglob("*.jsonl")), tmp_path / "a" / "segmentation.json"]:
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
    # adding rows of another category changes no other category's sample
    more = segment([*rows, *rows_of({"song": 50})], seed=3)

    def picked(seg: Any, cat: str) -> list[dict[str, Any]]:
        return [r for r in seg.training["qa"] if r["category"] == cat]

    assert picked(more, "coding")[: len(picked(a, "coding"))] == picked(a, "coding")


def test_empty_mapped_categories_and_experts_do_not_crash() -> None:
    seg = segment(rows_of({"coding": 30}))
    assert seg.counts["code"].own == 30 and seg.counts["code"].cross == 0
    for name in ("qa", "creative", "reasoning", "function", "general"):
        assert seg.training[name] == [] and seg.routing[name] == []
        assert any(f"expert {name!r} has no rows" in w for w in seg.warnings)


# --- unmapped categories -------------------------------------------------------------------


def test_unmapped_category_is_warned_counted_and_kept() -> None:
    rows = rows_of({"trivia": 30, "limerick": 7, "": 2, "coding": 30})
    seg = segment(rows)
    assert seg.unmapped == {"": 2, "limerick": 7}
    assert any("7 rows of category 'limerick'" in w and "'general'" in w for w in seg.warnings)
    assert any("2 rows without a category" in w for w in seg.warnings)
    general = seg.counts["general"]
    assert general.own == 39
    assert general.own_by_category == {"trivia": 30, "": 2, "limerick": 7}
    assert sum(1 for r in seg.training["general"] if r.get("category") == "limerick") == 7
    # and they are cross-sampled like any category of the fallback expert
    assert seg.counts["code"].cross_by_category == {"trivia": 2, "": 1, "limerick": 1}
    assert seg.dropped == 0
    kept = sum(c.own for c in seg.counts.values())
    assert kept == len(rows)


def test_unmapped_drop_and_custom_fallback() -> None:
    rows = rows_of({"trivia": 30, "limerick": 7})
    dropped = segment(rows, expert_map_from_dict({"unmapped": "drop"}))
    assert dropped.dropped == 7 and dropped.unmapped == {"limerick": 7}
    assert any("7 rows of category 'limerick'" in w and "dropped" in w for w in dropped.warnings)
    assert all(r["category"] != "limerick" for t in dropped.training.values() for r in t)
    to_creative = segment(rows, expert_map_from_dict({"fallback": "creative"}))
    assert to_creative.counts["creative"].own_by_category == {"limerick": 7}


# --- routing -------------------------------------------------------------------------------


def test_routing_rows_shape_and_cap() -> None:
    rows = [
        *rows_of({"coding": 5}),
        {"instruction": "Fix this.", "response": "ok", "category": "coding", "system": "Sys."},
        {"instruction": "Hi", "response": "x", "category": "coding", "system": ""},
        *rows_of({"trivia": 40}),
    ]
    seg = segment(rows)
    assert seg.routing["code"] == [{"instruction": f"A chat. coding q{i}"} for i in range(5)] + [
        {"instruction": "Sys. Fix this."},
        {"instruction": "A chat. Hi"},
    ]
    # own rows only: cross-sampled rows never become routing samples
    assert all(r["instruction"].startswith("A chat. trivia") for r in seg.routing["general"])
    assert seg.counts["general"].routing == 40

    capped = segment(rows, max_routing_samples=10)
    assert capped.counts["general"].routing == 10
    sample = capped.routing["general"]
    assert len({r["instruction"] for r in sample}) == 10
    full = seg.routing["general"]
    positions = [full.index(r) for r in sample]
    assert positions == sorted(positions)  # input order kept
    assert capped.routing["code"] == seg.routing["code"]  # under the cap: all kept
    assert capped.routing == segment(rows, max_routing_samples=10).routing


# --- inputs --------------------------------------------------------------------------------


def test_empty_dataset_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SegmentError, match="empty dataset"):
        segment([])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(SegmentError, match=r"empty dataset: no rows in .*empty\.jsonl"):
        read_rows([empty])


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "a row must be a JSON object, got list"),
        ('{"instruction": "x", "category": "joke"}', "response: missing"),
        ('{"instruction": 3, "response": "y"}', "instruction: must be a string"),
        ('{"instruction": "x", "response": "y", "category": 5}', "category: must be a string"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, expected: str) -> None:
    good = write_jsonl(tmp_path / "a.jsonl", rows_of({"joke": 2}))
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps(rows_of({"joke": 1})[0]) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(SegmentError) as exc:
        read_rows([good, bad])
    assert str(exc.value).startswith(f"{bad}:3: ")
    assert expected in str(exc.value)


def test_missing_and_non_utf8_inputs(tmp_path: Path) -> None:
    with pytest.raises(SegmentError, match="input file not found"):
        read_rows([tmp_path / "nope.jsonl"])
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'{"instruction": "a", "response": "b"}\n\xff\xfe\n')
    with pytest.raises(SegmentError, match=r"bin\.jsonl:2: not UTF-8"):
        read_rows([binary])


def test_rows_from_several_files_in_order(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", rows_of({"joke": 2}))
    b = write_jsonl(tmp_path / "b.jsonl", rows_of({"coding": 1}))
    assert [r["category"] for r in read_rows([a, b])] == ["joke", "joke", "coding"]


# --- files ---------------------------------------------------------------------------------


def test_write_segmentation_files_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stale = out / "training_data" / "expert_old.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}\n", encoding="utf-8")
    keep = out / "training_data" / "notes.txt"
    keep.write_text("mine", encoding="utf-8")
    rows = [
        *rows_of({"coding": 30, "limerick": 3}),
        {"instruction": "é", "response": "ü", "category": "joke", "extra": 1},
    ]
    seg = segment(rows, seed=9)
    summary_path = write_segmentation(seg, out)
    assert not stale.exists() and keep.exists()
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("expert_*.jsonl"))
    assert files == [
        "routing_data/expert_code.jsonl",
        "routing_data/expert_creative.jsonl",
        "routing_data/expert_general.jsonl",
        "training_data/expert_code.jsonl",
        "training_data/expert_creative.jsonl",
        "training_data/expert_general.jsonl",
    ]
    creative = [json.loads(x) for x in (out / "training_data/expert_creative.jsonl").open()]
    assert creative[0] == rows[-1]  # unchanged, extra keys included
    code_routing = (out / "routing_data/expert_code.jsonl").read_text(encoding="utf-8")
    assert [json.loads(x) for x in code_routing.splitlines()] == seg.routing["code"]
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    assert summary_path == out / "segmentation.json"
    assert summary["total_rows"] == 34 and summary["seed"] == 9
    assert summary["unmapped"] == {"limerick": 3}
    assert summary["warnings"] == seg.warnings
    code = summary["experts"]["code"]
    assert (code["own"], code["cross"], code["routing"]) == (30, 2, 30)
    assert code["training_file"] == "training_data/expert_code.jsonl"
    assert summary["experts"]["qa"]["training_file"] is None
    assert summary["map"]["sampling"]["divisor"] == ORIGINAL_DIVISOR
    # the map in the summary loads back as an experts config
    assert summary["map_source"] == "default"
    again = expert_map_from_dict(summary["map"])
    assert again.experts == seg.expert_map.experts


# --- the CLI -------------------------------------------------------------------------------


def _one_error_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.startswith("airoboros:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_cli_segments_and_prints_a_table(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows_of({"coding": 40, "trivia": 20}))
    more = write_jsonl(tmp_path / "more.jsonl", rows_of({"limerick": 4}))
    cfg = tmp_path / "experts.yaml"
    cfg.write_text("sampling: {max_routing_samples: 5}\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["segment-experts", "--input", str(data), str(more), "--output", str(out)]
    proc = run_cli(*args, "--experts-config", str(cfg), "--seed", "5", timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:5] == ["expert", "own", "cross", "total", "routing"]
    code_line = next(x for x in lines if x.startswith("code "))
    assert code_line.split()[1:5] == ["40", "3", "43", "5"]
    assert "warning: 4 rows of category 'limerick'" in proc.stderr
    summary = json.loads((out / "segmentation.json").read_text(encoding="utf-8"))
    assert summary["seed"] == 5
    assert summary["experts"]["general"]["own"] == 24
    assert len((out / "routing_data/expert_general.jsonl").read_text().splitlines()) == 5


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{oops\n', encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    good = write_jsonl(tmp_path / "good.jsonl", rows_of({"joke": 3}))
    badcfg = tmp_path / "experts.yaml"
    badcfg.write_text("experts:\n  qa: {categories: [a]}\n", encoding="utf-8")
    cases = [
        (["--input", str(bad)], f"{bad}:2: not valid JSON"),
        (["--input", str(empty)], "empty dataset"),
        (["--input", str(tmp_path / "nope.jsonl")], "input file not found"),
        (["--input", str(good), "--experts-config", str(badcfg)], "fallback"),
        (["--input", str(good), "--max-routing-samples", "0"], "--max-routing-samples"),
    ]
    for extra, expected in cases:
        proc = run_cli("segment-experts", "--output", str(tmp_path / "out"), *extra, timeout=120)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert expected in _one_error_line(proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists()


# --- automatic expert splitting (--split-above) ------------------------------------------------

_PY = [
    "Write a Python function that reverses a list",
    "How do I read a CSV file with pandas in Python?",
    "Write a Python script that counts words in a text file",
    "Explain Python list comprehensions with an example",
    "Write a Python class for a bank account with deposit and withdraw",
    "How do I sort a dictionary by value in Python?",
    "Write a Python generator that yields Fibonacci numbers",
    "Use Python's requests library to download a web page",
    "Write a Python decorator that times a function",
    "How do I create a virtual environment for a Python project?",
    "Write a Python program that parses JSON from a file",
    "Explain the difference between a Python tuple and a list",
]
_JS = [
    "Write a JavaScript function that debounces another function",
    "How do I fetch JSON from an API in JavaScript with async/await?",
    "Write a React component in JavaScript that shows a counter",
    "Explain JavaScript promises and how to chain them",
    "Write a Node.js server in JavaScript that answers hello world",
    "How do I add an event listener to a button in JavaScript?",
    "Write a JavaScript function that deep clones an object",
    "Explain the JavaScript event loop",
    "Write JavaScript that filters an array of objects by a property",
    "How do closures work in JavaScript?",
    "Write a JavaScript function that validates an email address",
    "Use JavaScript to change the text of a DOM element",
]
_SQL = [
    "Write an SQL query that selects the ten highest paid employees",
    "How do I join two tables in SQL on a customer id?",
    "Write an SQL query that counts orders per customer with GROUP BY",
    "Explain SQL indexes and when a database should use them",
    "Write an SQL statement that deletes duplicate rows from a table",
    "How do I create a table with a primary key in PostgreSQL SQL?",
    "Write an SQL query with a subquery that finds customers without orders",
    "Explain the difference between INNER JOIN and LEFT JOIN in SQL",
    "Write an SQL query that computes a running total with a window function",
    "How do I update rows in an SQL table from another table?",
    "Write an SQL query that finds the second highest salary",
    "Explain SQL transactions and isolation levels",
]
_HELD_OUT_PY = "Write a Python function that merges two sorted lists into one sorted list"


def _code_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for lang, texts in (("python", _PY), ("javascript", _JS), ("sql", _SQL)):
        for t in texts:
            rows.append(
                {"instruction": t, "response": f"Here is the {lang} answer.", "category": "coding"}
            )
    # interleave so the order of the input does not decide the clusters
    rows = rows[0::3] + rows[1::3] + rows[2::3]
    trivia = [
        {"instruction": f"What is the capital of country number {i}?", "response": "Paris.",
         "category": "trivia"}
        for i in range(8)
    ]  # fmt: skip
    return rows + trivia


@pytest.fixture(scope="module")
def split_embedder() -> Any:
    from airoboros.embeddings import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder()


def test_split_above_clusters_code_by_language(split_embedder: Any) -> None:
    from airoboros.trainer.segment import split_experts

    rows = _code_rows()
    result = split_experts(rows, ExpertMap(), above=20, embed=split_embedder.embed, seed=7)
    (code,) = [s for s in result.splits if s.expert == "code"]
    names = sorted(p.name for p in code.parts)
    assert names == ["code-javascript", "code-python", "code-sql"], code.reason
    for p in code.parts:
        lang = p.name.removeprefix("code-")
        assert all(rows[i]["instruction"] in {"python": _PY, "javascript": _JS, "sql": _SQL}[lang]
                   for i in p.rows)  # fmt: skip
        assert len(p.rows) == 12 and lang in p.description.lower()
    # the map replaces "code" in place; the others and the trivia rows are unchanged
    assert "code" not in result.expert_map.experts
    assert result.expert_map.names.index("code-python") == ExpertMap().names.index("code")
    assert {r["category"] for r in result.rows if r.get("source_category") == "coding"} == set(
        names
    )
    assert [r for r in result.rows if r["category"] == "trivia"] == rows[-8:]
    # deterministic for a seed
    again = split_experts(rows, ExpertMap(), above=20, embed=split_embedder.embed, seed=7)
    assert again.rows == result.rows and again.expert_map == result.expert_map
    # segmentation of the relabelled rows gives each sub-expert its own training + routing
    seg = segment(result.rows, result.expert_map, seed=7)
    assert seg.counts["code-python"].own == 12 and seg.counts["code-sql"].routing == 12


def test_split_above_leaves_small_and_homogeneous_experts_whole(split_embedder: Any) -> None:
    from airoboros.trainer.segment import split_experts

    rows = _code_rows()
    # N respected: code has 36 rows, so N = 36 splits nothing
    same = split_experts(rows, ExpertMap(), above=36, embed=split_embedder.embed)
    assert same.splits == [] and same.expert_map.names == ExpertMap().names
    assert same.rows == rows
    # a homogeneous expert over N: near-identical questions reach no silhouette threshold
    homog = [
        {"instruction": f"What is the capital of France? (asked {i} times)", "response": "Paris.",
         "category": "trivia"}
        for i in range(30)
    ]  # fmt: skip
    res = split_experts(homog, ExpertMap(), above=10, embed=split_embedder.embed)
    (general,) = res.splits
    assert general.expert == "general" and general.parts == []
    assert "not split" in general.reason and res.expert_map.names == ExpertMap().names
    with pytest.raises(SegmentError, match="at least 1"):
        split_experts(rows, ExpertMap(), above=0, embed=split_embedder.embed)


async def test_split_experts_route_a_held_out_python_question(
    split_embedder: Any, tmp_path: Path
) -> None:
    from airoboros.router.routing import Router
    from airoboros.trainer.segment import split_experts, write_split

    rows = _code_rows()
    result = split_experts(rows, ExpertMap(), above=20, embed=split_embedder.embed, seed=7)
    seg = segment(result.rows, result.expert_map, seed=7)
    write_segmentation(seg, tmp_path)
    write_split(result, tmp_path)
    for name in seg.routing:
        if seg.routing[name]:
            d = tmp_path / "adapters" / name
            d.mkdir(parents=True)
            (d / "description.txt").write_text(result.expert_map.experts[name].description)
    routed = sorted(p.stem.removeprefix("expert_") for p in (tmp_path / "routing_data").iterdir())
    assert {"code-python", "code-javascript", "code-sql"} <= set(routed)
    router = Router(split_embedder)
    await router.load_package(str(tmp_path))
    decision = await router.route(f"A chat. {_HELD_OUT_PY}")
    assert decision is not None and decision.expert == "code-python"
    # the written map and dataset read back into the same segmentation (train-experts' input)
    again = segment(
        read_rows([tmp_path / "dataset.jsonl"]), load_expert_map(tmp_path / "experts.yaml"), seed=7
    )
    assert again.counts["code-python"].own == 12


def test_cli_split_above(tmp_path: Path) -> None:
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _code_rows()))
    out = tmp_path / "out"
    r = run_cli("segment-experts", "--input", str(data), "--output", str(out),
                "--split-above", "20", "--seed", "7")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "code (36 rows): split into 3" in r.stdout
    assert (out / "routing_data" / "expert_code-python.jsonl").is_file()
    assert not (out / "routing_data" / "expert_code.jsonl").exists()
    summary = json.loads((out / "split.json").read_text())
    assert summary["experts"]["code"]["parts"]["code-sql"]["rows"] == 12
    bad = run_cli("segment-experts", "--input", str(data), "--output", str(out),
                  "--split-above", "0")  # fmt: skip
    assert bad.returncode == 2 and "--split-above" in bad.stderr
