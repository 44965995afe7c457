"""airoboros.topics.cull: clusters, the judge, the decisions, resume, bad input.

Uses the real all-MiniLM-L6-v2 embedder and the scripted server, whose judge answerer
(tests/fakes/answer_judge.py) says BAD to a reply holding BADANSWER, GOOD otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from airoboros.config import Config, parse_config
from airoboros.topics.cull.engine import (
    CullInputError,
    CullRow,
    CullStateError,
    Judge,
    build_plan,
    greedy_clusters,
    judge_threshold,
    parse_verdict,
    read_jsonl,
)
from airoboros.topics.cull.files import cull_files
from airoboros.topics.cull.ledger import FileLedger
from tests.e2e.helpers import REPO, airoboros_cmd, cli_env, run_cli

FRANCE = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What's the capital city of France?", "Paris is the capital city of France, on the Seine."),
    (
        "Which city is the capital of France?",
        "Paris is the capital of France. BADANSWER and a long, confident but wrong aside.",
    ),
]
CAKE = [
    (
        "How do I bake a chocolate cake at home?",
        "Mix flour, sugar, cocoa, eggs and butter, then bake at 180C for 35 minutes. BADANSWER",
    ),
    (
        "How can I bake a chocolate cake at home?",
        "Combine flour, sugar, cocoa, eggs and butter and bake at 180C for 35 minutes. BADANSWER",
    ),
]
SKY = ("Why is the sky blue?", "Rayleigh scattering scatters short blue wavelengths more.")
JOKE = ("Tell me a joke about cats.", "BADANSWER Why did the cat sit on the computer?")
LINKED = (
    "Write a python function that reverses a linked list.",
    "def rev(head):\n    prev = None\n    while head:\n"
    "        head.next, prev, head = prev, head, head.next\n    return prev",
)
MATH = ("What is 17 times 3?", "17 times 3 is 51.")

#: Pass-through lines, written with odd spacing and escapes: they must come out unchanged.
RP_LINE = (
    '{"category": "rp",  "instruction": "A chat.\\nUSER: hi\\u00e9", '
    '"response": "BADANSWER Hello!", "skip_prompt_formatting": true}'
)
CONTEXTUAL_LINE = (
    '{"response":"Green. BADANSWER","category":"contextual","instruction":"BEGININPUT\\n'
    'Sky is green.\\nENDINPUT\\nBEGININSTRUCTION\\nWhat colour?\\nENDINSTRUCTION"}'
)


def row(pair: tuple[str, str], category: str = "general", **extra: Any) -> dict[str, Any]:
    return {"instruction": pair[0], "response": pair[1], "category": category, **extra}


def dataset() -> list[str]:
    """Input lines: near-duplicates among unrelated rows, pass-through rows, a coding pair
    that differs only by PLAINFORMAT, and a legacy category."""
    rows: list[Any] = [
        row(FRANCE[0]),
        row(SKY, system="Answer in one sentence.", source="kept-extra-key"),
        RP_LINE,
        row(CAKE[0]),
        row(FRANCE[1]),
        row(LINKED, "coding"),
        row((LINKED[0] + " PLAINFORMAT", LINKED[1]), "coding"),
        row(JOKE, "joke"),
        CONTEXTUAL_LINE,
        row(FRANCE[2]),
        row(CAKE[1]),
        row(MATH, "reasoning_or_math"),
    ]
    return [r if isinstance(r, str) else json.dumps(r) for r in rows]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def make_config(tmp: Path, base_url: str, **extra: Any) -> Config:
    return parse_config(
        {
            "model": "gpt-4",
            "openai_api_key": "sk-test",
            "base_url": base_url,
            "output_path": str(tmp / "unused.jsonl"),
            "request_timeout": 10,
            "max_retries": 1,
            "max_retry_time": 5,
            "min_docsearch_score": 0.35,
            **extra,
        }
    )


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]


# --- pure parts ---------------------------------------------------------------------------


def test_parse_verdict() -> None:
    assert parse_verdict("GOOD") is True
    assert parse_verdict(" bad.\n") is False
    assert parse_verdict("**GOOD**") is True
    assert parse_verdict("<think>is it BAD? no</think>GOOD") is True
    assert parse_verdict("Having weighed it all, the answer is BAD") is False
    assert parse_verdict("GOODNESS me") is None
    assert parse_verdict("") is None


def test_threshold_resolution(tmp_path: Path) -> None:
    assert judge_threshold(make_config(tmp_path, "x")) == 100
    assert judge_threshold(make_config(tmp_path, "x", scoring={"threshold": "90"})) == 90
    cfg = make_config(tmp_path, "x", scoring={"threshold": "90"}, cull_threshold=70)
    assert judge_threshold(cfg) == 70


def test_greedy_clusters_take_later_rows_and_respect_max_k() -> None:
    v = np.array([[1, 0], [0, 1], [1, 0.01], [1, 0.02], [0.01, 1]], dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert greedy_clusters(v, 0.99, 1000) == [[0, 2, 3], [1, 4]]
    # k = 2: the leader and its single most similar neighbour; the rest lead their own.
    assert greedy_clusters(v, 0.99, 2) == [[0, 2], [1, 4], [3]]
    assert greedy_clusters(v, 0.99, 1) == [[0], [1], [2], [3], [4]]


def test_judge_prompt_carries_the_row_and_the_system_prompt(tmp_path: Path) -> None:
    judge = Judge(make_config(tmp_path, "x", cull_threshold=80), llm=None)  # type: ignore[arg-type]
    text = judge.messages(CullRow("Q {threshold}?", "A.", "general", "Be terse.", "f:1"))[0][
        "content"
    ]
    assert "<request>\nQ {threshold}?\n</request>" in text  # row text is not a template
    assert "<system_prompt>\nBe terse.\n</system_prompt>" in text
    assert "80 or higher" in text
    plain = judge.messages(CullRow("Q", "A.", "general"))[0]["content"]
    assert "system_prompt" not in plain and "{system" not in plain


# --- planning -----------------------------------------------------------------------------


def test_clusters_form_on_planted_near_duplicates(tmp_path: Path, embedder: Any) -> None:
    src = read_jsonl([write_lines(tmp_path / "in.jsonl", dataset())])
    rows = [s.row for s in src]
    plan = build_plan(rows, embedder=embedder, config=make_config(tmp_path, "x"))
    groups = sorted(sorted(u.members) for u in plan.clusters)
    # France 0, 4, 9 and cake 3, 10 cluster; coding 5 and 6 (PLAINFORMAT) stay apart.
    assert groups == [[0, 4, 9], [1], [3, 10], [5], [6], [7], [11]]
    assert sorted(i for u in plan.units if not u.judged for i in u.members) == [2, 8]
    assert [u.members[0] for u in plan.units] == sorted(u.members[0] for u in plan.units)
    assert rows[11].category == "orca"


def test_plainformat_rows_would_cluster_without_the_rule(embedder: Any) -> None:
    v = embedder.embed([LINKED[0] + "\n" + LINKED[1], LINKED[0] + " PLAINFORMAT\n" + LINKED[1]])
    assert float(v[0] @ v[1]) > 0.9  # so the separation above is the rule's doing


# --- whole runs ---------------------------------------------------------------------------


async def test_cull_keeps_best_good_drops_bad_passes_through(
    tmp_path: Path, llm_server: Any, embedder: Any
) -> None:
    srv = llm_server()
    lines = dataset()
    inp = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "culled.jsonl"
    result = await cull_files(make_config(tmp_path, srv.base_url), [inp], out, embedder=embedder)

    written = out.read_text(encoding="utf-8").splitlines()
    rows = read(out)
    # Rows, never wrappers, in input order (a cluster where its first row was).
    assert all(set(r) >= {"instruction", "response", "category"} for r in rows)
    assert not any("item" in r or "line" in r for r in rows)
    assert [r["instruction"] for r in rows] == [
        FRANCE[1][0],  # the longest good one of the three (the longest is BAD)
        SKY[0],
        "A chat.\nUSER: hié",
        LINKED[0],
        LINKED[0] + " PLAINFORMAT",
        "BEGININPUT\nSky is green.\nENDINPUT\nBEGININSTRUCTION\nWhat colour?\nENDINSTRUCTION",
        MATH[0],
    ]
    # Pass-through lines byte for byte, BADANSWER and all; extra keys kept on judged rows.
    assert RP_LINE in written and CONTEXTUAL_LINE in written
    assert written[1] == lines[1] and rows[1]["source"] == "kept-extra-key"
    assert rows[-1]["category"] == "orca"
    t = result.counts.total()
    assert (t.kept, t.dropped, t.passed, t.judge_errors) == (5, 5, 2, 0)
    assert t.clusters == 7
    # Every judged row was asked about once; pass-through rows never.
    assert srv.llm.stats["requests"] == 10
    assert any("<system_prompt>\nAnswer in one sentence." in p for p in srv.llm.prompts)

    # A rerun of a finished cull has nothing to do and rewrites nothing.
    again = await cull_files(make_config(tmp_path, srv.base_url), [inp], out, embedder=embedder)
    assert out.read_text(encoding="utf-8").splitlines() == written
    assert srv.llm.stats["requests"] == 10
    assert again.counts.total().kept == 5


async def test_judge_errors_count_as_good(tmp_path: Path, llm_server: Any, embedder: Any) -> None:
    srv = llm_server(bad_request_marker="JUDGEFAIL")
    inp = write_lines(
        tmp_path / "in.jsonl",
        [
            json.dumps(row(SKY)),
            json.dumps(row(("Name a prime number.", "Seven. JUDGEFAIL"))),
            json.dumps(row(("Name a red fruit.", "A cherry. JUDGEGARBLE"), "trivia")),
        ],
    )
    out = tmp_path / "out.jsonl"
    result = await cull_files(make_config(tmp_path, srv.base_url), [inp], out, embedder=embedder)
    assert len(read(out)) == 3
    t = result.counts.total()
    assert (t.kept, t.dropped, t.judge_errors) == (3, 0, 2)


class Boom(Exception):
    pass


async def test_resume_after_a_crash_repeats_no_row_and_no_verdict(
    tmp_path: Path, llm_server: Any, embedder: Any
) -> None:
    srv = llm_server()
    lines = dataset()
    inp = write_lines(tmp_path / "in.jsonl", lines)
    cfg = make_config(tmp_path, srv.base_url, judge={"batch_size": 1})
    ref = tmp_path / "ref.jsonl"
    await cull_files(cfg, [inp], ref, embedder=embedder)
    calls = srv.llm.stats["requests"]

    # Die from the 6th judge call on, then leave a torn tail behind as a kill could.
    out = tmp_path / "out.jsonl"
    real = Judge.__call__
    seen = {"n": 0}

    async def dying(self: Judge, r: CullRow) -> Any:
        seen["n"] += 1
        if seen["n"] >= 6:
            raise Boom()
        return await real(self, r)

    Judge.__call__ = dying  # type: ignore[method-assign]
    try:
        with pytest.raises(Boom):
            await cull_files(cfg, [inp], out, embedder=embedder)
    finally:
        Judge.__call__ = real  # type: ignore[method-assign]
    with out.open("a") as f:
        f.write('{"instruction": "half a ro')
    with (tmp_path / "out.jsonl.cull-journal").open("a") as f:
        f.write('{"c": 99, "o"')
    before = srv.llm.stats["requests"]
    assert before - calls == 5

    result = await cull_files(cfg, [inp], out, embedder=embedder)
    assert out.read_bytes() == ref.read_bytes()
    assert srv.llm.stats["requests"] - calls == calls  # every row judged exactly once
    assert result.resumed_from > 0 and result.reused_verdicts == 5


def test_resume_after_sigkill_of_the_command(tmp_path: Path, llm_server: Any) -> None:
    srv = llm_server(latency=0.1)
    lines = [
        json.dumps(row((f"Question number {i} about {w}?", f"Answer {i}: {w}.")))
        for i, w in enumerate(["otters", "glaciers", "violins", "comets", "bakeries"] * 8)
    ]
    inp = write_lines(tmp_path / "in.jsonl", lines)
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(
        json.dumps(
            {
                "model": "gpt-4",
                "openai_api_key": "sk-test",
                "base_url": srv.base_url,
                "request_timeout": 10,
                "max_retry_time": 5,
                # Low enough that these 40 rows stay 40 clusters of one.
                "min_docsearch_score": 0.001,
                "judge": {"batch_size": 2},
            }
        )
    )
    out = tmp_path / "out.jsonl"
    args = ["cull-instructions", "--config-path", str(cfg_path), "--input", str(inp)]
    proc = subprocess.Popen(
        airoboros_cmd(*args, "--output", str(out)),
        env=cli_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= 8:
            break
        if proc.poll() is not None:
            raise AssertionError(f"finished before the kill: {proc.stderr.read()!r}")  # type: ignore[union-attr]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = srv.llm.stats["requests"]
    assert 8 <= first < 40

    again = run_cli(*args, "--output", str(out))
    assert again.returncode == 0, again.stderr
    assert "resumed at decision" in again.stderr
    assert out.read_text().splitlines() == lines  # all good: every row, once, in order
    # At most the calls in flight at the kill (2) are asked twice.
    assert srv.llm.stats["requests"] <= 40 + 2


# --- bad input and state ------------------------------------------------------------------


def test_missing_input_file(tmp_path: Path) -> None:
    with pytest.raises(CullInputError, match=r"nope\.jsonl: no such file"):
        read_jsonl([tmp_path / "nope.jsonl"])


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('{"instruction": "x", "response": ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"instruction": "x", "response": "y"}', "'category' is missing"),
        ('{"instruction": 3, "response": "y", "category": "general"}', "'instruction' is a int"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, why: str) -> None:
    inp = write_lines(tmp_path / "in.jsonl", [json.dumps(row(SKY)), "", line])
    with pytest.raises(CullInputError) as exc:
        read_jsonl([inp])
    assert f"{inp}:3: " in str(exc.value) and why in str(exc.value)


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    inp = write_lines(tmp_path / "in.jsonl", [json.dumps(row(SKY)), "{oops"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("openai_api_key: sk-test\nbase_url: http://127.0.0.1:9/v1\n")
    proc = run_cli(
        "cull-instructions", "--config-path", str(cfg), "--input", str(inp), "--output",
        str(tmp_path / "o.jsonl"),
    )  # fmt: skip
    assert proc.returncode == 2
    errors = [x for x in proc.stderr.splitlines() if x.startswith("airoboros:")]
    assert len(errors) == 1 and f"{inp}:2: not valid JSON" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


async def test_foreign_output_and_changed_inputs_are_refused(
    tmp_path: Path, llm_server: Any, embedder: Any
) -> None:
    srv = llm_server()
    cfg = make_config(tmp_path, srv.base_url)
    inp = write_lines(tmp_path / "in.jsonl", [json.dumps(row(SKY))])
    out = write_lines(tmp_path / "out.jsonl", ["{}"])
    with pytest.raises(CullInputError, match="exists and holds rows"):
        await cull_files(cfg, [inp], out, embedder=embedder)
    out.unlink()
    await cull_files(cfg, [inp], out, embedder=embedder)
    write_lines(inp, [json.dumps(row(MATH))])
    with pytest.raises(CullStateError, match="other inputs or settings"):
        await cull_files(cfg, [inp], out, embedder=embedder)
    assert FileLedger(out, []).plan_path.exists()
