"""Logging for every process: readable lines on a terminal, JSON lines otherwise (with the
trace and span ids inside a span, and the traceback when there is one)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

#: Libraries whose INFO lines are noise in our logs.
NOISY = (
    "httpx",
    "httpx2",
    "openai",
    "httpcore",
    "httpcore2",
    "sentence_transformers",
    "alembic",
    "faiss",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; inside a span, with its ``trace_id`` and ``span_id`` (the
    ids the trace UI shows), and the exception when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        from airoboros.telemetry import log_ids

        out: dict[str, Any] = {
            "ts": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ids = log_ids()
        if ids is not None:
            out["trace_id"], out["span_id"] = ids
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
