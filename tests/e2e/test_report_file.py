"""An embedded run writes its quality report beside its output (``<output>.report.json``),
its counts agreeing with the JSONL; a user's file of that name is left alone; the command's
summary prints the report's table."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from airoboros.cli.embedded import Generation
from airoboros.cli.generate import summary_lines
from airoboros.config import load_config
from airoboros.protocol import JobReport
from tests.e2e.helpers import read_rows, run_cli, write_config

INSTRUCTORS = {"general": {"count": 8}, "joke": {"count": 5}, "riddle": {"count": 4}}


async def run(cfg_path: Path, embedder: Any) -> Any:
    return await Generation(load_config(cfg_path), embedder=embedder, seed=3).run()


async def test_an_embedded_run_writes_a_report_matching_its_output(tmp_path, llm_server, embedder):
    srv = llm_server(duplicate_rate=0.25, refusal_rate=0.1)
    cfg = write_config(tmp_path, srv.base_url, instructors=INSTRUCTORS)
    result = await run(cfg, embedder)
    assert result.status == "done"
    rows = read_rows(tmp_path / "instructions.jsonl")
    per_category = Counter(r["category"] for r in rows)
    assert per_category == {k: v["count"] for k, v in INSTRUCTORS.items()}

    path = tmp_path / "instructions.report.json"
    assert result.report_path == path
    report = JobReport.model_validate(json.loads(path.read_text()))
    assert report == result.report
    assert report.status == "done"
    by = {c.category: c for c in report.categories}
    for name, n in per_category.items():
        c = by[name]
        assert (c.kept, c.rows, c.target) == (n, n, n)
        assert c.proposed >= c.kept + c.duplicates
        assert c.requests > 0 and c.cost_to_finish == 0.0
        assert c.diversity.instructions == n
        assert c.diversity.nn_scope == "category" and c.diversity.nn_sampled >= n
        assert c.diversity.nn_cosine is not None
    # the server repeated items: dedupe caught some, and the yield shows it
    dups = sum(c.duplicates for c in report.categories)
    assert srv.llm.stats["duplicates_served"] > 0 and dups > 0
    assert report.totals.dedupe_yield == round(len(rows) / (len(rows) + dups), 4)
    assert (report.totals.kept, report.totals.rows) == (len(rows), len(rows))
    assert report.totals.requests == srv.llm.stats["requests"] - srv.llm.stats.get("429", 0)
    assert report.totals.diversity.instructions == len(rows)
    # the job's index holds every category's vectors
    assert report.totals.diversity.nn_sampled == sum(
        c.diversity.nn_sampled for c in report.categories
    )

    table = summary_lines(result)
    assert any(line.split()[:2] == ["general", "8/8"] for line in table)
    assert table[-1] == f"quality report: {path}"


async def test_a_users_file_of_the_reports_name_is_not_overwritten(tmp_path, llm_server, embedder):
    srv = llm_server()
    mine = tmp_path / "instructions.report.json"
    mine.write_text("my own notes\n")
    cfg = write_config(tmp_path, srv.base_url, instructors={"general": {"count": 3}})
    result = await run(cfg, embedder)
    assert result.status == "done"
    assert mine.read_text() == "my own notes\n"
    assert result.report_path is None and result.report is not None
    assert result.report.totals.kept == 3


def test_the_command_prints_the_report_table(tmp_path, llm_server):
    srv = llm_server()
    cfg = write_config(tmp_path, srv.base_url, instructors={"joke": {"count": 3}})
    proc = run_cli("generate-instructions", "--config-path", str(cfg), "--plain")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    head = next(
        i for i, line in enumerate(lines) if line.split()[:3] == ["category", "kept", "proposed"]
    )
    assert lines[head + 1].split()[:2] == ["joke", "3/3"]
    assert lines[head + 2].split()[:2] == ["(job)", "3/3"]
    report = json.loads((tmp_path / "instructions.report.json").read_text())
    assert report["totals"]["kept"] == 3
