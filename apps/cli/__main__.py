"""``python -m airoboros.cli``: the ``airoboros`` command."""

from airoboros.cli.main import entry

entry()
