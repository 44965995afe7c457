"""python -m airoboros.dedupe"""

import asyncio

from airoboros import telemetry
from airoboros.dedupe.worker import run_worker
from airoboros.logs import setup_logging
from airoboros.settings import DedupeSettings

if __name__ == "__main__":
    settings = DedupeSettings()
    setup_logging(settings.log_level.upper() == "DEBUG")
    telemetry.setup("airoboros-dedupe")
    asyncio.run(run_worker(settings))
