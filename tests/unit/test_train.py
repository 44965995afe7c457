"""The LoRA training core on a tiny random Llama, on CPU.

What is checked: the prompt format and its loss mask on a real collated batch; that a packed
row computes exactly what its examples compute alone (no attention across examples); that
training lowers the loss and saves an adapter PEFT can load and that changes the model;
resuming after SIGKILL from the latest checkpoint; and the errors a person can act on.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from airoboros.errors import ConfigError  # noqa: E402
from airoboros.trainer.data import PackedCollator, PaddedCollator  # noqa: E402
from airoboros.trainer.train import (  # noqa: E402
    IGNORE_INDEX,
    BaseModelNotFound,
    ExpertResult,
    TrainConfig,
    TrainConfigError,
    TrainingDataError,
    format_example,
    format_examples,
    pack,
    pack_examples,
    train_expert,
)
from tests.fakes.tiny_llama import build_tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

# The Trainer rotates checkpoints by mtime and warns that tmpfs mtimes may be coarse.
pytestmark = pytest.mark.filterwarnings("ignore:mtime may not be reliable")

# Eight facts, repeated: a tiny model can learn them within a few dozen steps.
FACTS = [
    ("What colour is the sky?", "The sky is blue."),
    ("What is 2 plus 2?", "2 plus 2 is 4."),
    ("Name a fruit.", "An apple is a fruit."),
    ("Where is Paris?", "Paris is in France."),
    ("What do cows drink?", "Cows drink water."),
    ("How many legs has a cat?", "A cat has four legs."),
    ("What is ice?", "Ice is frozen water."),
    ("Say hello.", "Hello there, friend!"),
]
ROWS = [
    {"instruction": q, "response": a, "category": "general"} for _ in range(4) for q, a in FACTS
]


def fast_config(**overrides: Any) -> TrainConfig:
    """Small and quick; gradient checkpointing off (it triples a tiny model's step time)."""
    base: dict[str, Any] = {
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "max_length": 128,
        "batch_size": 2,
        "learning_rate": 5e-3,
        "warmup_ratio": 0.0,
        "max_grad_norm": 1.0,
        "gradient_checkpointing": False,
        "eval_fraction": 0.0,
        "save_steps": 1000,
    }
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # A tiny model gains nothing from more threads, and OpenMP threads spinning against
    # other busy processes on a small CI machine slow each matmul down many times over.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # initializer_range 0.1: logits a LoRA can sharpen within a few dozen steps.
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", initializer_range=0.1)


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="module")
def trained(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> ExpertResult:
    out = tmp_path_factory.mktemp("trained")
    cfg = fast_config(max_steps=36, eval_fraction=0.1, save_steps=12)
    return train_expert(tiny_base, ROWS, out, expert="general", config=cfg, progress=False)


# --- formatting and masking ---------------------------------------------------------------


def test_prompt_masked_exactly_on_a_real_batch(tokenizer: Any) -> None:
    rows = [
        {"instruction": "What is 2 plus 2?", "response": "4.", "category": "math"},
        {"instruction": "Hi", "response": "Hello!", "system": "You are terse.", "category": "x"},
        {
            "instruction": "[INST] raw prompt [/INST]",
            "response": "raw answer",
            "skip_prompt_formatting": True,
            "category": "x",
        },
    ]
    expected_prompts = [
        "A chat.\nUSER: What is 2 plus 2?\nASSISTANT: ",
        "You are terse.\nUSER: Hi\nASSISTANT: ",
        "[INST] raw prompt [/INST]",
    ]
    examples, dropped = format_examples(rows, tokenizer, max_length=128)
    assert dropped == 0
    for packing in (True, False):
        if packing:
            feats = pack(examples, max_length=128)
            batch = PackedCollator(tokenizer.pad_token_id)(feats)
            # One packed row holding the three examples; split it back by position resets.
            assert batch["input_ids"].shape[0] == 1
            starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
            bounds = [*starts, batch["input_ids"].shape[1]]
            segs = [(0, a, b) for a, b in itertools.pairwise(bounds)]
            order = _bin_order(examples)  # the examples' indices in the row, in row order
        else:
            batch = PaddedCollator(tokenizer.pad_token_id)(examples)
            segs = [(r, 0, int(batch["attention_mask"][r].sum())) for r in range(len(examples))]
            order = list(range(len(examples)))
        assert batch["n_examples"] == len(rows)
        for (r, a, b), i in zip(segs, order, strict=True):
            ids = batch["input_ids"][r, a:b].tolist()
            labels = batch["labels"][r, a:b].tolist()
            prompt_ids = [tokenizer.bos_token_id] + tokenizer(
                expected_prompts[i], add_special_tokens=False
            )["input_ids"]
            n = len(prompt_ids)
            assert ids[:n] == prompt_ids
            assert labels[:n] == [IGNORE_INDEX] * n  # -100 exactly on BOS + prompt ...
            assert labels[n:] == ids[n:]  # ... and nowhere on response + EOS
            assert ids[-1] == tokenizer.eos_token_id
            assert tokenizer.decode(ids[n:-1]) == rows[i]["response"]
        if not packing:
            pad = batch["attention_mask"] == 0
            assert (batch["labels"][pad] == IGNORE_INDEX).all()


def _bin_order(examples: list[dict[str, list[int]]]) -> list[int]:
    (only_bin,) = pack_examples([len(e["input_ids"]) for e in examples], 128)
    return only_bin


def test_too_long_examples_are_dropped_and_counted(tokenizer: Any) -> None:
    short = {"instruction": "Hi", "response": "Hello"}
    long = {"instruction": "word " * 200, "response": "ok"}
    assert format_example(long, tokenizer, max_length=64) is None
    ex = format_example(short, tokenizer, max_length=64)
    assert ex is not None and len(ex["input_ids"]) == len(ex["labels"]) <= 64
    examples, dropped = format_examples([short, long, short], tokenizer, max_length=64)
    assert (len(examples), dropped) == (2, 1)


def test_pack_examples_fills_bins_within_max_length() -> None:
    lengths = [50, 10, 90, 30, 70, 20, 60, 40, 100, 5, 5, 15]
    bins = pack_examples(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) == -(-sum(lengths) // 100)  # optimal here: 495 tokens in 5 bins
    with pytest.raises(ValueError):
        pack_examples([101], 100)


# --- packing is exact ----------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_compute_what_examples_compute_alone(
    tiny_base: Path, tokenizer: Any, attn: str
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation=attn).eval()
    rows = [
        {"instruction": q * (1 + i % 3), "response": a * (1 + i % 2)}
        for i, (q, a) in enumerate(FACTS)
    ]
    examples, _ = format_examples(rows, tokenizer, max_length=96)
    feats = pack(examples, max_length=96)
    batch = PackedCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)(feats)
    pos = batch["position_ids"]  # [rows, seq]
    assert batch["input_ids"].shape[0] >= 2 and batch["n_tokens"] < pos.numel()  # some padding
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache, transformers ignores packing.
        packed = model(
            input_ids=batch["input_ids"],
            position_ids=pos,
            labels=batch["labels"],
            use_cache=False,
        )
        # Control: the same rows with running positions let tokens see earlier examples.
        leaky = model(
            input_ids=batch["input_ids"],
            position_ids=torch.arange(pos.shape[1]).expand_as(pos),
            use_cache=False,
        ).logits
        loss_sum, n_targets, max_diff, max_leak = 0.0, 0, 0.0, 0.0
        for r, feat in enumerate(feats):
            start = 0
            for length in _segments(feat["position_ids"]):
                ids = feat["input_ids"][start : start + length]
                labels = feat["labels"][start : start + length]
                alone = model(
                    input_ids=torch.tensor([ids]), labels=torch.tensor([labels])
                )  # one example, plain causal attention
                sl = slice(start, start + length)
                max_diff = max(
                    max_diff, (packed.logits[r, sl] - alone.logits[0]).abs().max().item()
                )
                max_leak = max(max_leak, (leaky[r, sl] - alone.logits[0]).abs().max().item())
                n = sum(1 for x in labels[1:] if x != IGNORE_INDEX)
                loss_sum += alone.loss.item() * n
                n_targets += n
                start += length
    assert max_diff < 1e-4, f"packed logits differ from per-example logits by {max_diff}"
    assert max_leak > 1e-2, "control failed: running positions should leak across examples"
    assert packed.loss.item() == pytest.approx(loss_sum / n_targets, rel=1e-5)


def _segments(position_ids: list[int]) -> list[int]:
    """Lengths of the segments of one packed row (positions restart at 0 for each)."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return [b - a for a, b in itertools.pairwise(starts)]


# --- training ------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_outputs(trained: ExpertResult) -> None:
    out = trained.adapter_dir.parent
    assert trained.adapter_dir == out / "adapter"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 37))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.5 * first, f"loss did not go down enough: {first:.3f} -> {last:.3f}"
    m = trained.metrics
    assert json.loads((out / "metrics.json").read_text()) == m
    assert m["steps"] == 36 and m["eval_examples"] == 3 and m["train_examples"] == 29
    assert m["eval_loss"] < losses[0]
    assert [r["step"] for r in log if "eval_loss" in r] == [12, 24, 36]
    assert m["samples"] > 0 and m["tokens"] > m["samples"] and m["samples_per_second"] > 0
    assert m["train_loss"] == pytest.approx(sum(losses) / len(losses))


def test_saved_adapter_loads_and_changes_the_output(
    trained: ExpertResult, tiny_base: Path, tokenizer: Any
) -> None:
    from peft import PeftModel

    cfg = json.loads((trained.adapter_dir / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 8
    # "all-linear": every linear layer of the 2 blocks (peft may list full module paths).
    targets = {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    ids = tokenizer("A chat.\nUSER: What is ice?\nASSISTANT: ", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, trained.adapter_dir).eval()
        after = tuned(ids).logits
        # The adapter learned the answer: it is far likelier than under the base model.
        target = tokenizer("Ice is frozen water.", add_special_tokens=False).input_ids
        full = torch.cat([ids, torch.tensor([target])], dim=1)
        lp_tuned = _logprob(tuned(full).logits, full, ids.shape[1])
        with tuned.disable_adapter():
            lp_base = _logprob(tuned(full).logits, full, ids.shape[1])
    assert (after - before).abs().max().item() > 1e-2
    assert lp_tuned > lp_base + 5.0


def _logprob(logits: Any, ids: Any, start: int) -> float:
    lp = torch.log_softmax(logits[0, start - 1 : -1], dim=-1)
    return float(lp.gather(1, ids[0, start:, None]).sum())


def test_unpacked_with_gradient_checkpointing(tiny_base: Path, tmp_path: Path) -> None:
    cfg = fast_config(max_steps=3, packing=False, gradient_checkpointing=True, eval_fraction=0.1)
    res = train_expert(tiny_base, ROWS, tmp_path, expert="e", config=cfg, progress=False)
    assert res.metrics["steps"] == 3 and res.metrics["samples"] == 6  # 3 steps x 2 examples
    assert "packed_rows" not in res.metrics and "eval_loss" in res.metrics
    assert (res.adapter_dir / "adapter_model.safetensors").is_file()


KILL_SCRIPT = """
import json, sys, time
import torch
torch.set_num_threads(1)
import transformers
from pathlib import Path
from airoboros.trainer.train import TrainConfig, train_expert

# Slow each step down so that the parent can kill us mid-run.
original = transformers.Trainer.training_step
def slow(self, *a, **k):
    time.sleep(0.25)
    return original(self, *a, **k)
transformers.Trainer.training_step = slow

base, out, cfg = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
rows = json.loads(Path(sys.argv[4]).read_text())
train_expert(base, rows, out, expert="e", config=TrainConfig(**cfg), progress=False)
"""


def test_resume_after_sigkill_continues_from_the_checkpoint(
    tiny_base: Path, tmp_path: Path
) -> None:
    cfg = {**fast_config().__dict__, "max_steps": 30, "save_steps": 4, "lora_dropout": 0.1}
    out = tmp_path / "run"
    rows_file = tmp_path / "rows.json"
    rows_file.write_text(json.dumps(ROWS))
    script = tmp_path / "kill_me.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tiny_base), str(out), json.dumps(cfg), str(rows_file)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ckpt = out / "checkpoints" / "checkpoint-8" / "trainer_state.json"
    deadline = time.monotonic() + 120
    try:
        while not ckpt.is_file():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint-8 within 120 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()

    res = train_expert(tiny_base, ROWS, out, expert="e", config=TrainConfig(**cfg), progress=False)
    resumed = res.metrics["resumed_from_step"]
    assert 8 <= resumed < 30  # not 0: it picked the latest complete checkpoint up
    assert res.metrics["steps"] == 30
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # Steps logged before the kill past the checkpoint were retrained, and logged once.
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 31))
    # This call trained only the remaining steps: 2 packed rows per step, a few examples each.
    assert 0 < res.metrics["samples"] < (30 - resumed) * 2 * 128

    # The resumed run matches an uninterrupted one (data order, RNG and optimizer restored).
    ref = train_expert(
        tiny_base, ROWS, tmp_path / "ref", expert="e", config=TrainConfig(**cfg), progress=False
    )
    ref_log = [
        json.loads(x) for x in (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()
    ]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref_log], abs=2e-3)
    assert ref.metrics["resumed_from_step"] == 0

    # Called again after it finished (a redelivered job): nothing retrained, adapter re-saved.
    again = train_expert(
        tiny_base, ROWS, out, expert="e", config=TrainConfig(**cfg), progress=False
    )
    assert (again.metrics["resumed_from_step"], again.metrics["samples"]) == (30, 0)
    assert (again.adapter_dir / "adapter_model.safetensors").is_file()


# --- errors --------------------------------------------------------------------------------


def test_errors_name_the_problem(tiny_base: Path, tmp_path: Path) -> None:
    cfg = fast_config(max_steps=1)
    with pytest.raises(TrainingDataError, match="empty"):
        train_expert(tiny_base, [], tmp_path, expert="e", config=cfg)
    with pytest.raises(TrainingDataError, match=r"'response'.*rows 1\b"):
        train_expert(
            tiny_base,
            [{"instruction": "a", "response": "b"}, {"instruction": "a"}],
            tmp_path,
            expert="e",
            config=cfg,
        )
    with pytest.raises(TrainingDataError, match="'instruction'"):
        train_expert(tiny_base, [{"response": "b"}], tmp_path, expert="e", config=cfg)
    with pytest.raises(TrainingDataError, match="all 2 examples are longer than max_length=16"):
        train_expert(tiny_base, ROWS[:2], tmp_path, expert="e", config=fast_config(max_length=16))
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(BaseModelNotFound, match=re.escape(str(missing))):
        train_expert(missing, ROWS, tmp_path, expert="e", config=cfg)
    with pytest.raises(BaseModelNotFound, match=r"has no config\.json"):
        train_expert(tmp_path, ROWS, tmp_path / "o", expert="e", config=cfg)
    assert issubclass(TrainingDataError, ConfigError) and issubclass(BaseModelNotFound, ConfigError)


def test_config_from_dict() -> None:
    cfg = TrainConfig.from_dict({"learning_rate": "1e-4", "epochs": 3, "packing": "false"})
    assert (cfg.learning_rate, cfg.epochs, cfg.packing, cfg.lora_r) == (1e-4, 3.0, False, 64)
    assert TrainConfig.from_dict({"target_modules": ["q_proj", "v_proj"]}).target_modules == [
        "q_proj",
        "v_proj",
    ]
    with pytest.raises(ValueError, match="lora_rank"):
        TrainConfig.from_dict({"lora_rank": 8})
    with pytest.raises(TrainConfigError, match="'batch_size'"):
        TrainConfig.from_dict({"batch_size": 1.5})
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig.from_dict({"precision": "fp8"})
    defaults = TrainConfig()
    assert (defaults.lora_r, defaults.lora_alpha, defaults.lora_dropout) == (64, 16, 0.1)
    assert (defaults.learning_rate, defaults.max_grad_norm, defaults.seed) == (2e-4, 0.3, 11422)
