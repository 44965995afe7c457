"""python -m airoboros.trainer"""

import asyncio
import sys

from airoboros import telemetry
from airoboros.errors import ConfigError
from airoboros.logs import setup_logging
from airoboros.settings import TrainerSettings
from airoboros.trainer.worker import run_worker

if __name__ == "__main__":
    settings = TrainerSettings()
    setup_logging(settings.log_level.upper() == "DEBUG")
    telemetry.setup("airoboros-trainer")
    try:
        asyncio.run(run_worker(settings))
    except ConfigError as exc:
        print(f"airoboros trainer: {exc}", file=sys.stderr)
        sys.exit(2)
