"""The trainer worker: ``python -m airoboros.trainer``.

Consumes ``dataset.exported`` one message at a time (GPU memory is the constraint) and
trains the configured experts of each dataset. A failed expert is recorded in the
adapter registry (visible in the job's status) and the message is retried, then
dead-lettered: never lost.
"""

from __future__ import annotations

import asyncio
import logging

from airoboros.contracts import DatasetExported
from airoboros.errors import ConfigError
from airoboros.settings import TrainerSettings
from airoboros.store import make_store
from airoboros.trainer.pipeline import check_base_model
from airoboros.trainer.service import TrainerService
from airoboros.worker import make_bus, make_objects, serve, stop_event

log = logging.getLogger(__name__)
GROUP = "trainer"


async def run_worker(settings: TrainerSettings, stop: asyncio.Event | None = None) -> None:
    if not settings.base_model:
        raise ConfigError(["AIROBOROS_BASE_MODEL: set it to the base model's local path"])
    check_base_model(settings.base_model)
    stop = stop or stop_event()
    store = make_store(settings.database_url)
    await store.connect(migrate=False)
    objects = make_objects(settings)
    bus = make_bus(settings)
    service = TrainerService(settings, store.registry, objects, bus.publish)
    bus.subscribe(DatasetExported, service.on_dataset_exported, concurrency=1, group=GROUP)
    try:
        await serve(
            settings, bus, stop, f"trainer ready (base model {settings.base_model})", store=store
        )
    finally:
        await store.close()
