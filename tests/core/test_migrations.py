"""The migrations make exactly the schema core.models describes, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

from core import engines
from core.db import alembic_config, engine_for, migrate, session_factory
from core.models import Base, utcnow
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


def _insert_row(connection: Connection, table: Table, **values: Any) -> None:
    """A row with ``values`` and a placeholder in every other required column."""
    placeholders = {
        String: "x",
        Text: "x",
        Integer: 0,
        Boolean: False,
        JSON: {},
        DateTime: utcnow(),
    }
    for column in table.columns:
        if column.name in values or column.nullable or column.server_default is not None:
            continue
        kind = next(kind for kind in placeholders if isinstance(column.type, kind))
        values[column.name] = placeholders[kind]
    connection.execute(table.insert().values(**values))


def test_sqlite_upgrade_keeps_the_rows_that_point_at_a_rebuilt_table(tmp_path: Path) -> None:
    """SQLite rebuilds a table to alter it (batch mode): drop and re-create. With foreign keys
    enforced, the drop would run the ON DELETE rules of every table pointing at it (jobs'
    sweep_id set NULL, a webhook's messages deleted)."""
    settings = Settings(data_dir=tmp_path)
    command.upgrade(alembic_config(settings), "0004")  # sweeps and webhooks without 0005's keys
    engine = engine_for(settings)
    old = MetaData()
    old.reflect(engine)
    with engine.begin() as connection:
        _insert_row(connection, old.tables["sweeps"], id="sweep-1")
        _insert_row(connection, old.tables["jobs"], id="job-1", status="queued", sweep_id="sweep-1")
        _insert_row(connection, old.tables["webhooks"], id="hook-1")
        messages = old.tables["webhook_messages"]
        _insert_row(connection, messages, id="msg-1", webhook_id="hook-1", status="pending")

    migrate(settings)

    with engine.connect() as connection:
        assert connection.scalar(text("SELECT sweep_id FROM jobs")) == "sweep-1"
        assert connection.scalar(text("SELECT count(*) FROM webhook_messages")) == 1
        assert connection.scalar(text("PRAGMA foreign_keys")) == 1  # enforced again after


def test_a_build_held_across_the_upgrade_keeps_its_claim_under_a_hashed_token(
    tmp_path: Path,
) -> None:
    """0007 keeps the sha256 of each lease token, not the token: the builder's token still
    proves its claim, and the database no longer holds anything it could present."""
    settings = Settings(data_dir=tmp_path)
    command.upgrade(alembic_config(settings), "0006")
    engine = engine_for(settings)
    old = MetaData()
    old.reflect(engine)
    with engine.begin() as connection:
        _insert_row(connection, old.tables["jobs"], id="job-1", status="succeeded", tenant="local")
        _insert_row(connection, old.tables["engine_builds"], id="build-1", job_id="job-1",
                    status="building", builder="agent:nano", lease_token="the-token")  # fmt: skip

    migrate(settings)

    with engine.connect() as connection:
        stored = connection.scalar(text("SELECT lease_token_sha256 FROM engine_builds"))
    assert stored == engines.token_sha256("the-token") != "the-token"
    with session_factory(settings)() as session:
        build = engines.held_build(session, "local", "build-1", "the-token")
        assert build.id == "build-1"
        with pytest.raises(engines.EngineBuildNotClaimed):
            engines.held_build(session, "local", "build-1", stored)  # the hash is no token
