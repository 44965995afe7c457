"""Training one LoRA expert: rows in, a PEFT adapter out.

``train_expert`` formats the rows in the airoboros chat format (loss on the response only),
packs them into rows of up to ``max_length`` tokens, and trains a LoRA adapter on the base
model with the Hugging Face ``Trainer``. Defaults are those of the original airoboros LMoE
training (reference §5.2: r=64, alpha=16, dropout 0.1, all linear layers, lr 2e-4 constant,
5 epochs, max_grad_norm 0.3, seed 11422, QLoRA nf4 with double quantisation, bf16).

Output layout under ``output_dir``::

    adapter/            adapter_config.json + adapter_model.safetensors (save_pretrained)
    checkpoints/        checkpoint-<step>/ every save_steps; the latest complete one is
                        resumed from automatically when train_expert is called again
    train_log.jsonl     one line per logged step: {"step", "loss", "learning_rate", ...},
                        and {"step", "eval_loss"} after each evaluation
    metrics.json        ExpertResult.metrics
    run.json            fingerprint of data and training shape, checked before resuming

Multi-GPU: launch the calling script with ``torchrun``/``accelerate launch``; every rank calls
``train_expert`` with the same arguments and the Trainer does DDP. Only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airoboros.errors import ConfigError
from airoboros.trainer.data import (
    COUNT_KEYS,
    IGNORE_INDEX,
    TrainingDataError,
    build_prompt,
    format_example,
    format_examples,
    pack,
    pack_examples,
    validate_rows,
)

__all__ = [
    "IGNORE_INDEX",
    "BaseModelNotFound",
    "ExpertResult",
    "TrainConfig",
    "TrainConfigError",
    "TrainingDataError",
    "build_prompt",
    "format_example",
    "format_examples",
    "pack",
    "pack_examples",
    "train_expert",
    "validate_rows",
]

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
TRAIN_LOG = "train_log.jsonl"
METRICS = "metrics.json"
RUN_FILE = "run.json"

_PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_QUANTIZE = {"auto": "auto", "nf4": "on", "on": "on", "true": "on", "yes": "on", "4bit": "on"}
_QUANTIZE.update({"off": "off", "false": "off", "no": "off", "none": "off"})
_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
)


class TrainConfigError(ConfigError, ValueError):
    """A training option is unknown or has an invalid value (also a ValueError)."""

    code = "invalid_train_config"


class BaseModelNotFound(ConfigError):
    """The base model path does not exist or holds no model."""

    code = "base_model_not_found"

    def __str__(self) -> str:
        return "; ".join(self.problems)


@dataclass
class TrainConfig:
    """How to train one expert. Defaults are the original's (reference §5.2) where it had one.

    ``batch_size`` is per device; with packing it counts packed rows (each up to
    ``max_length`` tokens), so a step sees about ``batch_size * max_length`` tokens.
    ``precision`` "auto" is bf16 on a CUDA device that supports it, else fp32.
    ``quantize_4bit`` "auto" loads the base in 4-bit nf4 with double quantisation (QLoRA) when
    CUDA and bitsandbytes are present; "on" requires them; "off" never quantises.
    ``target_modules`` "all-linear" is every linear layer except the output head.
    """

    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: str | list[str] = "all-linear"
    epochs: float = 5.0
    max_steps: int = -1
    learning_rate: float = 2e-4
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    weight_decay: float = 0.0
    seed: int = 11422
    max_length: int = 4096
    batch_size: int = 4
    grad_accum: int = 1
    packing: bool = True
    gradient_checkpointing: bool = True
    precision: str = "auto"
    quantize_4bit: str = "auto"
    eval_fraction: float = 0.02
    save_steps: int = 100
    logging_steps: int = 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping (e.g. YAML). Unknown keys and bad values raise
        ``TrainConfigError`` (a ValueError) naming the key. Numbers given as strings
        (YAML reads ``2e-4`` as a string) are converted."""
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        problems = [
            f"unknown training option '{k}' (known: {', '.join(sorted(names))})"
            for k in d
            if k not in names
        ]
        values: dict[str, Any] = {}
        for k, v in d.items():
            if k not in names:
                continue
            try:
                values[k] = _coerce(v, hints[k])
            except (TypeError, ValueError) as e:
                problems.append(f"training option '{k}': {e}")
        if problems:
            raise TrainConfigError(problems)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ``TrainConfigError`` listing every out-of-range value."""
        p: list[str] = []
        for name in ("lora_r", "lora_alpha", "max_length", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                p.append(f"'{name}' must be >= 1, got {getattr(self, name)}")
        if self.save_steps < 1 or self.logging_steps < 1:
            p.append("'save_steps' and 'logging_steps' must be >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            p.append(f"'lora_dropout' must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.eval_fraction < 1.0:
            p.append(f"'eval_fraction' must be in [0, 1), got {self.eval_fraction}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            p.append(f"'warmup_ratio' must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps <= 0 and self.epochs <= 0:
            p.append("one of 'epochs' (> 0) or 'max_steps' (> 0) is needed")
        if self.learning_rate <= 0:
            p.append(f"'learning_rate' must be > 0, got {self.learning_rate}")
        if self.precision not in _PRECISIONS:
            p.append(f"'precision' must be one of {', '.join(_PRECISIONS)}, got {self.precision!r}")
        if str(self.quantize_4bit).lower() not in _QUANTIZE:
            p.append(f"'quantize_4bit' must be auto, on (nf4) or off, got {self.quantize_4bit!r}")
        if self.lr_scheduler not in _SCHEDULERS:
            p.append(
                f"'lr_scheduler' must be one of {', '.join(_SCHEDULERS)}, got {self.lr_scheduler!r}"
            )
        if p:
            raise TrainConfigError(p)


def _coerce(value: Any, hint: Any) -> Any:
    """Convert a config value to the field's type, or raise ValueError saying what was wrong."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        f = float(value)
        if not f.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(f)
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool):  # YAML reads `off` as False
            return "on" if value else "off"
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    if isinstance(hint, types.UnionType):  # target_modules: str | list[str]
        if isinstance(value, str):
            return value
        if isinstance(value, list | tuple) and all(isinstance(x, str) for x in value) and value:
            return list(value)
        raise ValueError(f"expected a string or a non-empty list of strings, got {value!r}")
    return value


@dataclass
class ExpertResult:
    """What ``train_expert`` produced. ``metrics``: train_loss (mean logged loss over the
    whole run, resumed parts included), eval_loss (when there is an eval split), steps,
    samples and tokens (trained on in this call), seconds (of this call's training loop),
    samples_per_second, tokens_per_second, train_examples, eval_examples, dropped_too_long,
    resumed_from_step, packed_rows (with packing)."""

    expert: str
    adapter_dir: Path
    metrics: dict[str, float | int] = field(default_factory=dict)


def train_expert(
    base_model: str | Path,
    rows: Sequence[dict[str, Any]],
    output_dir: Path,
    *,
    expert: str,
    config: TrainConfig,
    progress: bool = True,
) -> ExpertResult:
    """Train a LoRA adapter for ``expert`` on ``rows``; see the module docstring for outputs.

    Calling it again with the same ``output_dir``, rows and config after an interruption
    resumes from the latest complete checkpoint (optimizer, scheduler, RNG and data order
    included); after a finished run it only re-saves the adapter.

    Raises ``TrainingDataError`` (empty dataset, rows without instruction/response, every
    example longer than max_length), ``BaseModelNotFound`` and ``TrainConfigError``; all are
    ``ConfigError``s.
    """
    config.validate()
    validate_rows(rows)
    output_dir = Path(output_dir)
    base = _resolve_base_model(base_model)

    # Heavy imports here, not at module import, so that importing the trainer package
    # (e.g. for its config) stays cheap.
    import torch
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)  # type: ignore[no-untyped-call]
    examples, dropped = format_examples(rows, tokenizer, config.max_length)
    if dropped:
        log.warning(
            "%s: dropped %d of %d examples longer than max_length=%d tokens",
            expert,
            dropped,
            len(rows),
            config.max_length,
        )
    if not examples:
        raise TrainingDataError(
            [f"all {len(rows)} examples are longer than max_length={config.max_length} tokens"]
        )
    train_ex, eval_ex = _split(examples, config.eval_fraction, config.seed)
    pad_id = _pad_token_id(tokenizer)

    from airoboros.trainer.data import ListDataset, PackedCollator, PaddedCollator

    collator: PackedCollator | PaddedCollator
    if config.packing:
        train_items = pack(train_ex, config.max_length)
        eval_items = pack(eval_ex, config.max_length) if eval_ex else []
        collator = PackedCollator(pad_id, pad_to_multiple_of=8)
    else:
        train_items = [dict(e) for e in train_ex]
        eval_items = [dict(e) for e in eval_ex]
        collator = PaddedCollator(pad_id, pad_to_multiple_of=8)

    on_cuda = torch.cuda.is_available()
    precision = _resolve_precision(config.precision, on_cuda)
    quantize = _resolve_quantize(config.quantize_4bit, on_cuda)
    ckpt_root = output_dir / CHECKPOINT_DIR
    is_main = int(os.environ.get("RANK", "0")) == 0
    resume = _check_resume(output_dir, _fingerprint(base, rows, config), is_main)

    transformers.set_seed(config.seed)
    model = _load_model(base, config, precision, quantize)

    args = transformers.TrainingArguments(
        output_dir=str(ckpt_root),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_ratio=config.warmup_ratio,
        max_grad_norm=config.max_grad_norm,
        weight_decay=config.weight_decay,
        adam_beta2=0.999,
        optim="paged_adamw_32bit" if quantize else "adamw_torch",
        seed=config.seed,
        data_seed=config.seed,
        bf16=precision == "bf16",
        use_cpu=precision == "bf16" and not on_cuda,  # bf16 autocast on CPU, else refused
        fp16=precision == "fp16",
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy="steps" if eval_items else "no",
        eval_steps=config.save_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        # Two, not the original's one: if a kill lands while the newest is being written,
        # the previous complete one is still there to resume from.
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        report_to="none",
        disable_tqdm=not progress,
        remove_unused_columns=False,  # the collators' count keys are popped in CountingTrainer
        label_names=["labels"],  # PeftModel hides the signature the Trainer infers this from
        group_by_length=not config.packing,
        dataloader_num_workers=0,
        dataloader_pin_memory=on_cuda,
        ddp_find_unused_parameters=False,
        save_safetensors=True,
    )
    trainer = _make_trainer(
        model=model,
        args=args,
        train_dataset=ListDataset(train_items),
        eval_dataset=ListDataset(eval_items) if eval_items else None,
        data_collator=collator,
        log_path=output_dir / TRAIN_LOG,
        progress=progress,
    )

    resumed_from = 0
    if resume is not None:
        resumed_from = _checkpoint_step(resume)
        if is_main:
            _truncate_log(output_dir / TRAIN_LOG, resumed_from)
        log.info("%s: resuming from %s (step %d)", expert, resume, resumed_from)
    elif is_main:
        (output_dir / TRAIN_LOG).unlink(missing_ok=True)

    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    seconds = time.perf_counter() - started

    metrics: dict[str, float | int] = {}
    if eval_items:
        # The periodic evaluation may already have run at the last step.
        last = trainer.last_eval
        if last is None or last[0] != trainer.state.global_step:
            trainer.evaluate()
            last = trainer.last_eval
        assert last is not None
        metrics["eval_loss"] = last[1]
    counts = trainer.accelerator.reduce(
        torch.tensor([trainer.seen["n_examples"], trainer.seen["n_tokens"]], device=args.device),
        reduction="sum",
    ).tolist()
    samples, tokens = int(counts[0]), int(counts[1])
    metrics.update(
        {
            "steps": int(trainer.state.global_step),
            "samples": samples,
            "tokens": tokens,
            "seconds": round(seconds, 3),
            "samples_per_second": samples / seconds if seconds > 0 else 0.0,
            "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
            "train_examples": len(train_ex),
            "eval_examples": len(eval_ex),
            "dropped_too_long": dropped,
            "resumed_from_step": resumed_from,
        }
    )
    if config.packing:
        metrics["packed_rows"] = len(train_items)

    adapter_dir = output_dir / ADAPTER_DIR
    if trainer.is_world_process_zero():
        losses = [r["loss"] for r in _read_log(output_dir / TRAIN_LOG) if "loss" in r]
        if losses:
            metrics["train_loss"] = sum(losses) / len(losses)
        _save_adapter(trainer.model, adapter_dir)
        (output_dir / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    trainer.accelerator.wait_for_everyone()
    log.info("%s: adapter saved to %s (%s)", expert, adapter_dir, metrics)
    return ExpertResult(expert=expert, adapter_dir=adapter_dir, metrics=metrics)


# --- pieces -------------------------------------------------------------------------------


def _resolve_base_model(base_model: str | Path) -> str:
    """A local model directory, or a Hub id (``org/name``) resolved from the HF cache/hub."""
    p = Path(base_model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise BaseModelNotFound([f"base model directory {p} has no config.json"])
        return str(p)
    text = str(base_model)
    looks_like_hub_id = (
        not isinstance(base_model, Path)
        and not p.is_absolute()
        and not text.startswith((".", "~"))
        and text.count("/") == 1
    )
    if not looks_like_hub_id:
        raise BaseModelNotFound([f"base model path does not exist: {p}"])
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(text)
    except (OSError, ValueError) as e:
        raise BaseModelNotFound(
            [
                f"base model {text!r} is neither a local directory nor loadable from the "
                f"Hugging Face cache or hub ({type(e).__name__}: {str(e).splitlines()[0]})"
            ]
        ) from e
    return text


def _split(
    examples: list[dict[str, list[int]]], fraction: float, seed: int
) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]]]:
    """A seeded random eval split: ``fraction`` of the examples, at least one when
    fraction > 0 and there are two or more, never all of them."""
    n = len(examples)
    if fraction <= 0 or n < 2:
        return examples, []
    n_eval = min(n - 1, max(1, round(n * fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in eval_idx]
    held = [e for i, e in enumerate(examples) if i in eval_idx]
    return train, held


def _pad_token_id(tokenizer: Any) -> int:
    # Llama-2's tokenizer has no pad token; padding positions are masked out of attention
    # and loss, so any id works, and EOS is the usual choice.
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def _resolve_precision(precision: str, on_cuda: bool) -> str:
    import torch

    if precision == "auto":
        return "bf16" if on_cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not on_cuda:
        raise TrainConfigError(["precision 'fp16' needs a CUDA device; use fp32 or auto on CPU"])
    if precision == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise TrainConfigError(["precision 'bf16' is not supported by this GPU; use fp16 or auto"])
    return precision


def _resolve_quantize(value: str, on_cuda: bool) -> bool:
    import importlib.util

    mode = _QUANTIZE[str(value).lower()]
    available = on_cuda and importlib.util.find_spec("bitsandbytes") is not None
    if mode == "on" and not available:
        raise TrainConfigError(
            ["quantize_4bit is on, but 4-bit QLoRA needs a CUDA device and bitsandbytes"]
        )
    return mode == "on" or (mode == "auto" and available)


def _load_model(base: str, config: TrainConfig, precision: str, quantize: bool) -> Any:
    """The base model with a fresh LoRA adapter on it, ready for the Trainer."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    kwargs: dict[str, Any] = {"dtype": dtype}
    if torch.cuda.is_available() and dtype != torch.float32:
        from transformers.utils.import_utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            # Reads the packed rows' position ids as varlen boundaries: no mask at all.
            kwargs["attn_implementation"] = "flash_attention_2"
    if quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
        )
        # A quantised model cannot be moved after loading: put it on this rank's GPU now.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    model.config.use_cache = False  # incompatible with gradient checkpointing, useless in training
    if quantize:
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(  # type: ignore[no-untyped-call]
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        # The frozen embeddings output no grad; checkpointed blocks need one flowing in.
        model.enable_input_require_grads()  # type: ignore[no-untyped-call]
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        bias="none",
    )
    return get_peft_model(model, lora)


def _fingerprint(base: str, rows: Sequence[Mapping[str, Any]], config: TrainConfig) -> str:
    """Hash of what a checkpoint depends on: base model, data, and the training shape.
    Epochs, max_steps, save/logging intervals may change between a run and its resume."""
    h = hashlib.sha256()
    shape = dataclasses.asdict(config)
    for k in ("epochs", "max_steps", "save_steps", "logging_steps"):
        shape.pop(k)
    h.update(json.dumps({"base": base, "config": shape}, sort_keys=True).encode())
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def _complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint dirs whose save finished (the Trainer writes trainer_state.json last),
    oldest first."""
    if not root.is_dir():
        return []
    found = []
    for d in root.glob("checkpoint-*"):
        suffix = d.name.removeprefix("checkpoint-")
        if d.is_dir() and suffix.isdigit() and (d / "trainer_state.json").is_file():
            found.append(d)
    return sorted(found, key=_checkpoint_step)


def _checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix("checkpoint-"))


def _check_resume(output_dir: Path, fingerprint: str, is_main: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start. Refuses to resume another
    run's checkpoints (different data, base model or training shape)."""
    ckpts = _complete_checkpoints(output_dir / CHECKPOINT_DIR)
    run_file = output_dir / RUN_FILE
    if ckpts and run_file.is_file():
        previous = json.loads(run_file.read_text()).get("fingerprint")
        if previous != fingerprint:
            raise TrainConfigError(
                [
                    f"{output_dir / CHECKPOINT_DIR} holds checkpoints of a different run "
                    "(data, base model or training options changed); use a new output_dir "
                    "or delete that folder to start over"
                ]
            )
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    return ckpts[-1] if ckpts else None


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return records


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records past ``step``: they are retrained after resuming from it."""
    kept = [r for r in _read_log(path) if int(r.get("step", 0)) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _save_adapter(model: Any, adapter_dir: Path) -> None:
    """save_pretrained into a temporary folder, then swap it in: a reader never sees a
    half-written adapter."""
    tmp = adapter_dir.with_name(adapter_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    tmp.rename(adapter_dir)


def _make_trainer(
    *,
    model: Any,
    args: Any,
    train_dataset: Any,
    eval_dataset: Any,
    data_collator: Any,
    log_path: Path,
    progress: bool,
) -> Any:
    """A Trainer that counts examples/tokens, logs each step to ``log_path`` and shows the
    loss on its progress bar instead of printing a dict per step."""
    import torch
    from transformers import (
        PrinterCallback,
        ProgressCallback,
        Trainer,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )

    class CountingTrainer(Trainer):
        seen: dict[str, int]
        last_eval: tuple[int, float] | None = None  # (step, eval_loss)

        def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
            out = super().evaluate(*args, **kwargs)
            if "eval_loss" in out:
                self.last_eval = (self.state.global_step, float(out["eval_loss"]))
            return out

        def training_step(
            self,
            model: torch.nn.Module,
            inputs: dict[str, Any],
            num_items_in_batch: torch.Tensor | None = None,
        ) -> torch.Tensor:
            for k in COUNT_KEYS:
                self.seen[k] += int(inputs.pop(k, 0))
            return super().training_step(model, inputs, num_items_in_batch)

        def prediction_step(
            self,
            model: torch.nn.Module,
            inputs: dict[str, Any],
            prediction_loss_only: bool,
            ignore_keys: list[str] | None = None,
        ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
            for k in COUNT_KEYS:
                inputs.pop(k, None)
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    class JsonlLog(TrainerCallback):
        def on_log(
            self,
            args: TrainingArguments,
            state: TrainerState,
            control: TrainerControl,
            logs: dict[str, float] | None = None,
            **kwargs: Any,
        ) -> None:
            if not state.is_world_process_zero or not logs:
                return
            keep = ("loss", "eval_loss", "learning_rate", "grad_norm", "epoch")
            record: dict[str, Any] = {"step": state.global_step}
            record.update({k: _num(logs[k]) for k in keep if k in logs})
            if "loss" in record or "eval_loss" in record:
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")

    class LossBar(ProgressCallback):
        def on_log(
            self,
            args: TrainingArguments,
            state: TrainerState,
            control: TrainerControl,
            logs: dict[str, float] | None = None,
            **kwargs: Any,
        ) -> None:
            bar = self.training_bar
            if state.is_world_process_zero and bar is not None and logs and "loss" in logs:
                bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    trainer = CountingTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
    )
    trainer.seen = dict.fromkeys(COUNT_KEYS, 0)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(LossBar())
    trainer.add_callback(JsonlLog())
    return trainer


def _num(v: Any) -> float:
    return float(v)
