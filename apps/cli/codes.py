"""Exit codes and the one-line failure of every ``airoboros`` command."""

from __future__ import annotations

import sys

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_ENDPOINT, EXIT_BUDGET = 0, 1, 2, 3, 4
EXIT_INCOMPLETE, EXIT_INTERRUPTED = 5, 130


def fail(message: str, code: int) -> int:
    print(f"airoboros: {message}", file=sys.stderr)
    return code
