"""Versioned, forward-only schema migrations (alembic, raw SQL); run by ``koerier migrate``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from koerier.config import Settings

HERE = Path(__file__).parent


def alembic_config(settings: Settings) -> Config:
    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.attributes["conninfo"] = settings.database_conninfo
    return config


def upgrade(settings: Settings) -> None:
    """Bring the schema to the newest version; a no-op when it is there already."""
    command.upgrade(alembic_config(settings), "head")


def current(settings: Settings) -> str | None:
    """The schema version in the database, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    engine = create_engine("postgresql+psycopg://", creator=lambda: _connect(settings))
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _connect(settings: Settings):  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(settings.database_conninfo)
