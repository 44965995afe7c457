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


def example_config(tmp: Path, base_url: str, docs: Path | None = None) -> dict[str, Any]:
    """The repository's example-config.yaml (every category of the original, plus the
    documents instructor when ``docs`` is given) cut down to a few rows of each."""
    cfg: dict[str, Any] = yaml.safe_load((REPO / "example-config.yaml").read_text())
    cfg.update(
        openai_api_key="sk-test",
        base_url=base_url,
        output_path=str(tmp / "instructions.jsonl"),
        topics_path=str(tmp / "topics.txt"),
        topic_request_count=2,
        request_timeout=10,
        max_retry_time=30,
        default_batch_size=3,
    )
    small = {
        "experience": {"word_count": 60},
        "detailed_writing": {"word_count": 90, "count": 1},
        "rp": {"turn_count": 3, "count": 1},
        "gtkm": {"question_count": 3, "count": 1},
        "character": {"count": 3, "output_dir": str(tmp / "characters")},
        "counterfactual_contextual": {"count": 2},
    }
    for name, inst in cfg["instructors"].items():
        inst.update(count=2, batch_size=3)
        inst.update(small.get(name, {}))
    if docs is not None:
        cfg["instructors"]["documents"] = {"count": 2, "documents_path": str(docs)}
    return cfg


def write_docs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lighthouses.md").write_text(
        "# Lighthouses\n\n"
        "The lighthouse at Cape Verran was built in 1871 from granite quarried on the island. "
        "Its lamp burned whale oil until 1903, when the keepers switched to kerosene. "
        "The tower stands forty-one metres tall and its light can be seen from thirty "
        "kilometres away on a clear night.\n\n"
        "Keepers lived in a cottage beside the tower and kept a daily log of the weather, "
        "passing ships and the state of the lamp. The last keeper left in 1989, when the "
        "light was automated and a solar panel was fitted to the gallery roof.\n",
        encoding="utf-8",
    )
    (folder / "bees.txt").write_text(
        "Honey bees communicate the location of flowers with a waggle dance performed on the "
        "comb. The angle of the dance shows the direction relative to the sun, and its length "
        "shows the distance. A colony may hold fifty thousand workers in summer but only a "
        "few thousand in winter, when the bees cluster together to keep the queen warm.\n",
        encoding="utf-8",
    )
    return folder


#: routing samples of the two experts of the tiny LMoE package that lmoe.api serves in the
#: tests (tests/e2e/test_lmoe.py, the console's playground in tests/browser)
LMOE_SAMPLES = {
    "code": [
        "Write a python function that reverses a linked list.",
        "Implement binary search in Go and explain its complexity.",
        "Fix the bug in this JavaScript loop that never ends.",
        "Write a SQL query that finds duplicate emails in a users table.",
        "Refactor this Java class to use dependency injection.",
    ],
    "cooking": [
        "How long should I bake sourdough bread at 230 degrees?",
        "Give me a recipe for a creamy mushroom risotto.",
        "What can I use instead of eggs when baking a cake?",
        "How do I caramelise onions without burning them?",
        "Suggest a spice rub for slow-roasted lamb shoulder.",
    ],
}
