"""Helpers for end-to-end runs of generate-instructions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]

#: Every instructor built in this version, with the keys each needs.
ALL_INSTRUCTORS: dict[str, dict[str, Any]] = {
    "general": {},
    "contextual": {},
    "coding": {"coding_languages": ["python", "rust", "go"], "plain_ratio": 0.5},
    "trivia": {},
    "orca": {},
    "riddle": {},
    "joke": {},
    "wordgame": {},
    "writing": {"styles": ["happy", "tragic"]},
    "multiple_choice": {"contextual_ratio": 0.3},
    "agent": {},
}


def write_config(tmp: Path, base_url: str, **overrides: Any) -> Path:
    cfg: dict[str, Any] = {
        "model": "gpt-4",
        "openai_api_key": "sk-test",
        "base_url": base_url,
        "output_path": str(tmp / "instructions.jsonl"),
        "topics_path": str(tmp / "topics.txt"),
        "topic_prompt": "Give me a numbered list of 20 completely random topics. {topic_avoidance}",
        "topic_request_count": 2,
        "default_count": 5,
        "default_batch_size": 4,
        "request_timeout": 10,
        "max_retry_time": 30,
        "response_filters": ["my programming", "language model", "as an ai"],
        "instructors": {k: dict(v) for k, v in ALL_INSTRUCTORS.items()},
    }
    cfg.update(overrides)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(extra)
    return env


def airoboros_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from airoboros.cli import entry; entry()", *args]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        airoboros_cmd(*args),
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=timeout,
        cwd=REPO,
    )
