"""python -m airoboros.inference"""

import os
import sys

from airoboros import telemetry
from airoboros.errors import ConfigError
from airoboros.inference.settings import InferenceSettings
from airoboros.logs import setup_logging

if __name__ == "__main__":
    # Models and adapters are local folders or object-store URIs: never the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import uvicorn

    from airoboros.inference.app import create_app

    settings = InferenceSettings()
    setup_logging(settings.log_level.upper() == "DEBUG")
    telemetry.setup("airoboros-inference")
    try:
        app = create_app(settings)
    except ConfigError as exc:
        print(f"airoboros inference: {exc}", file=sys.stderr)
        sys.exit(2)
    # One process: the model is loaded once and the scheduler batches all its requests.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", workers=1)
