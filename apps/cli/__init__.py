"""The ``airoboros`` command (airoboros.cli.main) and the in-process composition of every
service (airoboros.cli.embedded): the top layer, and the only code besides airoboros.lmoe
that imports several services."""

from airoboros.cli.main import entry, main

__all__ = ["entry", "main"]
