"""From a dataset to published experts: segment, train each expert in turn, lay the
adapters out as an LMoE package, upload them, register them, announce them.

The CLI (``airoboros train-experts``) and the trainer service both call
``train_experts``; only where the dataset comes from and where events go differ.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airoboros.contracts import AdapterPublished, Message
from airoboros.errors import ConfigError
from airoboros.ports import ObjectStore
from airoboros.store import AdapterRegistry

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class ExpertOutcome:
    expert: str
    status: str  # published | failed
    adapter_dir: Path | None = None
    uri: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def dataset_version(rows: Sequence[dict[str, Any]]) -> str:
    """The same dataset always gets the same version, so a retried training (a
    redelivered message, a rerun after a kill) updates its registry row, not a new one."""
    h = hashlib.sha1()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:12]


def check_base_model(base_model: str | Path) -> None:
    path = Path(base_model)
    if not path.exists():
        raise ConfigError([f"base_model: {base_model} does not exist"])
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError([f"base_model: {base_model} has no config.json (not a model folder)"])


def write_expert(
    package: Path,
    expert: str,
    adapter_dir: Path,
    description: str,
    routing_rows: Sequence[dict[str, Any]],
) -> Path:
    """``adapters/<expert>/`` (the PEFT files and description.txt) and
    ``routing_data/expert_<expert>.jsonl``, the LMoE package layout."""
    target = package / "adapters" / expert
    target.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        src = adapter_dir / name
        if not src.is_file():
            raise FileNotFoundError(f"training left no {name} in {adapter_dir}")
        shutil.copyfile(src, target / name)
    (target / "description.txt").write_text(description.strip() + "\n", encoding="utf-8")
    routing = package / "routing_data" / f"expert_{expert}.jsonl"
    routing.parent.mkdir(parents=True, exist_ok=True)
    with routing.open("w", encoding="utf-8") as f:
        for row in routing_rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return target


async def upload_expert(
    objects: ObjectStore, prefix: str, package: Path, expert: str
) -> tuple[str, str]:
    """Upload one expert of a package; returns (adapter folder URI, routing file URI).
    The description goes last: a reader that finds it finds the whole adapter."""
    folder = package / "adapters" / expert
    base = f"{prefix}/adapters/{expert}"
    last = ""
    for name in (*ADAPTER_FILES, "description.txt"):
        last = await objects.put_bytes(f"{base}/{name}", (folder / name).read_bytes())
    routing_key = f"{prefix}/routing_data/expert_{expert}.jsonl"
    routing = await objects.put_bytes(
        routing_key, (package / "routing_data" / f"expert_{expert}.jsonl").read_bytes()
    )
    return last.rsplit("/", 1)[0], routing


async def train_experts(
    rows: Sequence[dict[str, Any]],
    *,
    base_model: str | Path,
    output: Path,
    experts: Sequence[str] | None = None,
    train_config: dict[str, Any] | None = None,
    expert_map_path: Path | None = None,
    registry: AdapterRegistry | None = None,
    objects: ObjectStore | None = None,
    object_prefix: str | None = None,
    publish: Callable[[Message], Awaitable[None]] | None = None,
    job_id: str | None = None,
    dataset_uri: str | None = None,
    progress: bool = True,
) -> list[ExpertOutcome]:
    """Segment ``rows`` and train the chosen experts one at a time (GPU memory is the
    limit). A failed expert is recorded (registry row ``failed``) and the others go on."""
    from airoboros.trainer.segment import (
        SegmentError,
        load_expert_map,
        segment,
        write_segmentation,
    )
    from airoboros.trainer.train import TrainConfig, train_expert

    check_base_model(base_model)
    if not rows:
        raise ConfigError(["dataset: no rows"])
    config = TrainConfig.from_dict(train_config or {})
    try:
        expert_map = load_expert_map(expert_map_path)
    except SegmentError as exc:
        raise ConfigError([str(exc)]) from None
    known = list(expert_map.experts)
    chosen = list(experts or known)
    unknown = [e for e in chosen if e not in expert_map.experts]
    if unknown:
        raise ConfigError(
            [f"experts: unknown expert(s) {', '.join(unknown)}; known: {', '.join(known)}"]
        )
    seg = segment(rows, expert_map, seed=config.seed)
    for warning in seg.warnings:
        log.warning("%s", warning)
    output.mkdir(parents=True, exist_ok=True)
    write_segmentation(seg, output)
    version = dataset_version(rows)
    prefix = object_prefix or f"experts/{version}"
    outcomes: list[ExpertOutcome] = []
    done: dict[str, Any] = {}
    if registry is not None:
        # A retried training (redelivered message, rerun) keeps what already got published.
        for rec in await registry.adapters():
            if rec.version == version and rec.status == "published" and rec.expert not in done:
                done[rec.expert] = rec
    for expert in chosen:
        if expert in done:
            rec = done[expert]
            log.info("%s %s is already published; not training it again", expert, version)
            outcomes.append(ExpertOutcome(expert, "published", None, rec.uri, rec.metrics))
            continue
        training = seg.training.get(expert, [])
        if not training:
            outcomes.append(ExpertOutcome(expert, "failed", error="no training rows"))
            if registry is not None:
                await registry.register(
                    expert, version, base_model=str(base_model), job_id=job_id,
                    dataset_uri=dataset_uri,
                )  # fmt: skip
                await registry.finish(expert, version, status="failed", detail="no training rows")
            continue
        if registry is not None:
            await registry.register(
                expert, version, base_model=str(base_model), job_id=job_id,
                dataset_uri=dataset_uri,
            )  # fmt: skip
        try:
            result = await asyncio.to_thread(
                train_expert,
                base_model,
                training,
                output / "work" / expert,
                expert=expert,
                config=config,
                progress=progress,
            )
            folder = write_expert(
                output,
                expert,
                result.adapter_dir,
                expert_map.experts[expert].description,
                seg.routing.get(expert, []),
            )
            uri = str(folder.resolve())
            routing_uri = str((output / "routing_data" / f"expert_{expert}.jsonl").resolve())
            if objects is not None:
                uri, routing_uri = await upload_expert(objects, prefix, output, expert)
            metrics = {k: float(v) for k, v in result.metrics.items()}
        except Exception as exc:
            log.exception("training %s failed", expert)
            detail = f"{type(exc).__name__}: {exc}"
            outcomes.append(ExpertOutcome(expert, "failed", error=detail))
            if registry is not None:
                await registry.finish(expert, version, status="failed", detail=detail)
            continue
        if registry is not None:
            await registry.finish(expert, version, status="published", uri=uri, metrics=metrics)
        if publish is not None:
            await publish(
                AdapterPublished(
                    expert=expert,
                    version=version,
                    base_model=str(base_model),
                    uri=uri,
                    routing_uri=routing_uri,
                    description=expert_map.experts[expert].description,
                    job_id=job_id,
                    dataset_uri=dataset_uri,
                    metrics=metrics,
                )
            )
        outcomes.append(ExpertOutcome(expert, "published", folder, uri, metrics))
    return outcomes
