"""python -m airoboros.topics"""

import uvicorn

from airoboros import telemetry
from airoboros.logs import setup_logging
from airoboros.settings import TopicsSettings
from airoboros.topics.app import create_app

if __name__ == "__main__":
    settings = TopicsSettings()
    setup_logging(settings.log_level.upper() == "DEBUG")
    telemetry.setup("airoboros-topics")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
