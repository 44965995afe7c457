"""python -m airoboros.router"""

import sys

import uvicorn

from airoboros import telemetry
from airoboros.errors import ConfigError
from airoboros.logs import setup_logging
from airoboros.router.app import create_app
from airoboros.router.settings import RouterSettings

if __name__ == "__main__":
    settings = RouterSettings()
    setup_logging(settings.log_level.upper() == "DEBUG")
    telemetry.setup("airoboros-router")
    try:
        app = create_app(settings)
    except ConfigError as exc:
        print(f"airoboros router: {exc}", file=sys.stderr)
        sys.exit(2)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
