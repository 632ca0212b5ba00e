"""The migrations make exactly the schema core.models describes, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from core.db import engine_for, migrate
from core.models import Base
from core.settings import Settings
from tests.fixtures_paths import unavailable

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    name = f"sqakd_migrations_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError:
        unavailable("no PostgreSQL at 127.0.0.1:5432")
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    yield url
    engine_for(Settings(database_url=url)).dispose()
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _schema_differences(settings: Settings) -> list[object]:
    migrate(settings)
    with engine_for(settings).connect() as connection:
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


def test_sqlite_schema_matches_models(settings: Settings) -> None:
    assert _schema_differences(settings) == []


def test_postgresql_schema_matches_models(tmp_path: Path, postgres_url: str) -> None:
    settings = Settings(data_dir=tmp_path, database_url=postgres_url)
    assert _schema_differences(settings) == []
