"""python -m airoboros.generator"""

import asyncio

from airoboros import telemetry
from airoboros.generator.worker import run_worker
from airoboros.logs import setup_logging
from airoboros.settings import GeneratorSettings

if __name__ == "__main__":
    settings = GeneratorSettings()
    setup_logging(settings.log_level.upper() == "DEBUG")
    telemetry.setup("airoboros-generator")
    asyncio.run(run_worker(settings))
