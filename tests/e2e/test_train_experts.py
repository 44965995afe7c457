"""airoboros train-experts end to end on a tiny Llama: segment, train two experts, the
LMoE package layout, the registry, and clear errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from airoboros.store import SqlStore
from tests.e2e.helpers import cli_env
from tests.fakes.tiny_llama import build_tiny_llama


def run_cli(*args: str, timeout: float = 600) -> Any:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", "from airoboros.cli import entry; entry()", *args],
        env=cli_env(OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dataset(path: Path) -> Path:
    rows = []
    for i in range(10):
        rows.append(
            {
                "instruction": f"Write a python function that returns {i}.",
                "response": f"def f():\n    return {i}",
                "category": "coding",
            }
        )
        rows.append(
            {"instruction": f"Tell me joke {i}.", "response": "Knock knock.", "category": "joke"}
        )
        rows.append({"instruction": f"Capital {i}?", "response": "Paris.", "category": "trivia"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("base") / "llama")


def train_config(tmp: Path) -> Path:
    path = tmp / "train.yaml"
    path.write_text(
        yaml.safe_dump(
            {"max_steps": 4, "lora_r": 4, "lora_alpha": 8, "max_length": 128, "batch_size": 2,
             "save_steps": 2, "eval_fraction": 0.0, "gradient_checkpointing": False}
        )
    )  # fmt: skip
    return path


def test_two_experts_package_and_registry(tmp_path: Path, base: Path) -> None:
    data = dataset(tmp_path / "data.jsonl")
    out = tmp_path / "lmoe"
    objects = tmp_path / "objects"
    proc = run_cli(
        "train-experts", "--dataset", str(data), "--base-model", str(base), "--output", str(out),
        "--experts", "code,creative", "--train-config", str(train_config(tmp_path)),
        "--object-store-url", f"file://{objects}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for expert in ("code", "creative"):
        folder = out / "adapters" / expert
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "description.txt",
        ]
        assert folder.joinpath("description.txt").read_text().strip()
        routing = [
            json.loads(x)
            for x in (out / "routing_data" / f"expert_{expert}.jsonl").read_text().splitlines()
        ]
        assert routing and all(r["instruction"].startswith("A chat. ") for r in routing)
        # uploaded in the same layout
        assert (objects / "experts").exists()
    # the adapters load with peft onto the base model and change its output
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        plain = model(ids).logits
        tuned = PeftModel.from_pretrained(model, out / "adapters" / "code")(ids).logits
    assert not torch.allclose(plain, tuned)

    async def rows() -> list[Any]:
        store = SqlStore(f"sqlite:///{out / 'registry.sqlite'}")
        await store.connect()
        try:
            return await store.registry.adapters()
        finally:
            await store.close()

    recs = {r.expert: r for r in asyncio.run(rows())}
    assert set(recs) == {"code", "creative"}
    for r in recs.values():
        assert r.status == "published" and r.base_model == str(base)
        assert r.metrics["steps"] == 4 and r.metrics["train_loss"] > 0
        assert r.uri and r.uri.endswith(f"adapters/{r.expert}")
    assert recs["code"].version == recs["creative"].version  # one dataset, one version

    # a rerun of the same dataset trains nothing again
    again = run_cli(
        "train-experts", "--dataset", str(data), "--base-model", str(base), "--output", str(out),
        "--experts", "code", "--train-config", str(train_config(tmp_path)),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "already published" in again.stderr or "published" in again.stderr


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown_expert", "unknown expert(s) astrology"),
        ("missing_base", "does not exist"),
        ("empty", "no rows"),
        ("malformed", "data.jsonl:2"),
    ],
)
def test_clear_errors(tmp_path: Path, base: Path, case: str, expected: str) -> None:
    data = dataset(tmp_path / "data.jsonl")
    args = ["--experts", "code"]
    model = str(base)
    if case == "unknown_expert":
        args = ["--experts", "code,astrology"]
    elif case == "missing_base":
        model = str(tmp_path / "nowhere")
    elif case == "empty":
        data.write_text("")
    elif case == "malformed":
        data.write_text('{"instruction": "a", "response": "b", "category": "coding"}\n{not json\n')
    proc = run_cli(
        "train-experts", "--dataset", str(data), "--base-model", model,
        "--output", str(tmp_path / "out"), *args,
    )  # fmt: skip
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("airoboros:")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
