"""python -m airoboros.dedupe"""

import asyncio

from airoboros.cli import setup_logging
from airoboros.dedupe.worker import run_worker
from airoboros.settings import DedupeSettings

if __name__ == "__main__":
    settings = DedupeSettings()
    setup_logging(settings.log_level.upper() == "DEBUG")
    asyncio.run(run_worker(settings))
