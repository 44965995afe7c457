"""One-off training of one job's dataset: ``python -m airoboros.trainer.job`` (the
Kubernetes Job in deploy/k8s/jobs/trainer-job.yaml). Same settings and same code as the
worker; the job id comes from ``JOB_ID``. Exit codes: 0 trained, 1 some expert failed,
2 bad settings."""

from __future__ import annotations

import asyncio
import os
import sys

from airoboros import telemetry
from airoboros.contracts import DatasetExported
from airoboros.errors import ConfigError
from airoboros.logs import setup_logging
from airoboros.settings import TrainerSettings
from airoboros.store import make_store
from airoboros.trainer.pipeline import check_base_model
from airoboros.trainer.service import TrainerService, TrainingFailed
from airoboros.worker import make_bus, make_objects


async def run_once(settings: TrainerSettings, job_id: str) -> None:
    check_base_model(settings.base_model)
    store = make_store(settings.database_url)
    await store.connect(migrate=False)
    bus = make_bus(settings)
    await bus.start()
    try:
        objects = make_objects(settings)
        job = await store.jobs.get(job_id)
        if not job.export_uri:
            raise ConfigError([f"JOB_ID: job {job_id} has no export (is it finished?)"])
        service = TrainerService(settings, store.registry, objects, bus.publish)
        await service.on_dataset_exported(
            DatasetExported(job_id=job_id, uri=job.export_uri, rows=0)
        )
    finally:
        await bus.close()
        await store.close()


def main() -> int:
    settings = TrainerSettings()
    setup_logging(settings.log_level.upper() == "DEBUG")
    telemetry.setup("airoboros-trainer")
    job_id = os.environ.get("JOB_ID", "")
    try:
        if not job_id:
            raise ConfigError(["JOB_ID: set it to the id of a finished job"])
        asyncio.run(run_once(settings, job_id))
    except ConfigError as exc:
        print(f"airoboros trainer: {exc}", file=sys.stderr)
        return 2
    except TrainingFailed as exc:
        print(f"airoboros trainer: training failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
