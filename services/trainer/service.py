"""The trainer's use case: a dataset was exported, so train its experts."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from airoboros.contracts import DatasetExported, Message
from airoboros.ports import ObjectStore
from airoboros.settings import TrainerSettings
from airoboros.store import AdapterRegistry
from airoboros.trainer.pipeline import train_experts

log = logging.getLogger(__name__)


class TrainingFailed(Exception):
    """Some experts failed: raised after they are recorded, so the message is retried
    (and dead-lettered after the last delivery), never dropped."""


class TrainerService:
    def __init__(
        self,
        settings: TrainerSettings,
        registry: AdapterRegistry,
        objects: ObjectStore,
        publish: Callable[[Message], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.objects = objects
        self.publish = publish

    def _train_config(self) -> dict[str, Any]:
        if not self.settings.train_config:
            return {}
        data = yaml.safe_load(Path(self.settings.train_config).read_text(encoding="utf-8"))
        return dict(data or {})

    async def on_dataset_exported(self, msg: DatasetExported) -> None:
        key = f"jobs/{msg.job_id}/export/instructions.jsonl"
        raw = await self.objects.get_bytes(key)
        rows = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
        work = Path(self.settings.work_dir) / msg.job_id
        experts = [e.strip() for e in self.settings.experts.split(",") if e.strip()] or None
        log.info("job %s: training %s on %d rows", msg.job_id, experts or "every expert", len(rows))
        outcomes = await train_experts(
            rows,
            base_model=self.settings.base_model,
            output=work,
            experts=experts,
            train_config=self._train_config(),
            expert_map_path=Path(self.settings.expert_map) if self.settings.expert_map else None,
            registry=self.registry,
            objects=self.objects,
            object_prefix=f"jobs/{msg.job_id}/experts",
            publish=self.publish,
            job_id=msg.job_id,
            dataset_uri=msg.uri,
            progress=False,
        )
        failed = [f"{o.expert}: {o.error}" for o in outcomes if o.status == "failed"]
        if failed:
            raise TrainingFailed("; ".join(failed))
        shutil.rmtree(work, ignore_errors=True)  # everything is in the object store now
