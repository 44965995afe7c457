"""The airoboros command as a user runs it: exit codes, one-line errors, resume after kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter

from tests.e2e.helpers import REPO, airoboros_cmd, cli_env, read_rows, run_cli, write_config


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("airoboros:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_bad_config_is_one_line_naming_every_key(tmp_path, llm_server):
    srv = llm_server()
    cfg = write_config(
        tmp_path,
        srv.base_url,
        default_count="many",
        response_filters=["(unclosed"],
        instructors={"coding": {"count": -1}},
    )
    proc = run_cli("generate-instructions", "--config-path", str(cfg))
    assert proc.returncode == 2
    line = one_line_error(proc)
    for key in (
        "default_count",
        "instructors.coding.count",
        "response_filters.0",
        "coding_languages",
    ):
        assert key in line, line
    assert srv.llm.stats["requests"] == 0


def test_missing_config_file(tmp_path):
    proc = run_cli("generate-instructions", "--config-path", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert "config file not found" in one_line_error(proc)


def test_unreachable_endpoint_is_one_line(tmp_path):
    cfg = write_config(tmp_path, "http://127.0.0.1:9/v1", instructors={"joke": {"count": 1}})
    proc = run_cli("generate-instructions", "--config-path", str(cfg), timeout=120)
    assert proc.returncode == 3
    assert "cannot connect" in one_line_error(proc)
    assert not (tmp_path / "instructions.jsonl").exists()


def test_missing_key_says_what_to_set(tmp_path):
    cfg = write_config(tmp_path, "x", instructors={"joke": {"count": 1}})
    text = cfg.read_text().replace("openai_api_key: sk-test\n", "").replace("base_url: x\n", "")
    cfg.write_text(text)
    proc = run_cli("generate-instructions", "--config-path", str(cfg))
    assert proc.returncode == 2
    assert "OPENAI_API_KEY" in one_line_error(proc)


def test_wrong_key_is_one_line(tmp_path, llm_server):
    srv = llm_server(require_key="sk-right")
    cfg = write_config(tmp_path, srv.base_url, instructors={"joke": {"count": 1}})
    proc = run_cli("generate-instructions", "--config-path", str(cfg))
    assert proc.returncode == 3
    assert "authentication failed" in one_line_error(proc)


def test_dry_run_calls_nothing(tmp_path, llm_server):
    srv = llm_server()
    instructors = {"rp": {}, "joke": {"count": 7}, "limericks": {}}
    cfg = write_config(tmp_path, srv.base_url, instructors=instructors)
    proc = run_cli("generate-instructions", "--config-path", str(cfg), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    plan = [line.split()[0] for line in lines if "count" in line and "phase" in line]
    # phases in order: the cards rp needs are made first, and come without a section
    assert plan == ["joke", "character", "rp"]
    assert "count     7" in proc.stdout and "phase characters" in proc.stdout
    assert "rp needs character" in proc.stdout
    assert "limericks" in proc.stdout and "skipped: unknown category" in proc.stdout
    assert srv.llm.stats["requests"] == 0
    assert not (tmp_path / "instructions.jsonl").exists()


def test_generate_topics(tmp_path, llm_server):
    srv = llm_server()
    cfg = write_config(tmp_path, srv.base_url, topic_request_count=3)
    proc = run_cli("generate-topics", "--config-path", str(cfg))
    assert proc.returncode == 0, proc.stderr
    topics = (tmp_path / "topics.txt").read_text().splitlines()
    assert len(topics) >= 40
    assert len({t.lower() for t in topics}) == len(topics)
    assert not any(t.endswith(":") or not t.strip() for t in topics)
    assert srv.llm.stats["requests"] == 3


def test_resume_after_sigkill_loses_nothing_and_repeats_nothing(tmp_path, llm_server):
    srv = llm_server(latency=0.05)
    counts = {"general": 30, "joke": 30, "trivia": 30}
    cfg = write_config(
        tmp_path,
        srv.base_url,
        max_concurrency=4,
        instructors={k: {"count": v} for k, v in counts.items()},
    )
    out = tmp_path / "instructions.jsonl"
    env = cli_env()
    proc = subprocess.Popen(
        [*airoboros_cmd("generate-instructions", "--config-path", str(cfg))],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= 20:
            break
        if proc.poll() is not None:
            raise AssertionError(f"finished before the kill: {proc.stderr.read()!r}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = [json.loads(line) for line in out.read_text().splitlines() if line.endswith("}")]
    assert 20 <= len(before) < sum(counts.values())

    again = run_cli("generate-instructions", "--config-path", str(cfg), env=env)
    assert again.returncode == 0, again.stderr
    rows = read_rows(out)
    assert Counter(r["category"] for r in rows) == counts
    assert rows[: len(before)] == before  # 0 lost
    keys = [(r["instruction"], r.get("system"), r["response"]) for r in rows]
    assert len(set(keys)) == len(keys)  # 0 duplicated

    # A third run has nothing to do and says so through the exit code.
    third = run_cli("generate-instructions", "--config-path", str(cfg), env=env)
    assert third.returncode == 2
    assert "append: true" in one_line_error(third)


def test_unknown_model_fails_fast_with_one_line(tmp_path, llm_server):
    srv = llm_server()
    cfg = write_config(
        tmp_path,
        srv.base_url,
        model="no-such-model",
        max_concurrency=4,
        instructors={"joke": {"count": 50}},
    )
    proc = run_cli("generate-instructions", "--config-path", str(cfg))
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert "no-such-model" in line and "not found" in line
    # With 4 calls allowed, one batch is in flight: its answer ends the job, no retries.
    assert srv.llm.stats["404"] == 1
