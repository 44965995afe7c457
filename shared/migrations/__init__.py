"""Alembic migrations, run by ``airoboros migrate`` or ``upgrade(url)``.

They run on SQLite and PostgreSQL alike (SQLite through batch mode)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` (async driver URL) up to ``revision``. Blocking."""
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["url"] = url
    command.upgrade(cfg, revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["url"] = url
    command.downgrade(cfg, revision)
