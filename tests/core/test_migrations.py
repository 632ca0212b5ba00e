"""The migrations make exactly the schema core.models describes, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from core.db import engine_for, migrate
from core.models import Base
from core.settings import Settings


def _schema_differences(settings: Settings) -> list[object]:
    migrate(settings)
    with engine_for(settings).connect() as connection:
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


def test_sqlite_schema_matches_models(settings: Settings) -> None:
    assert _schema_differences(settings) == []


def test_postgresql_schema_matches_models(tmp_path: Path, postgres_url: str) -> None:
    settings = Settings(data_dir=tmp_path, database_url=postgres_url)
    assert _schema_differences(settings) == []
