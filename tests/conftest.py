"""Fixtures shared by the API, worker and end-to-end tests: real databases, real files."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from core.db import engine_for, migrate, session_factory
from core.settings import Settings
from tests.factories import export_tiny_cnn, image_zip
from tests.fixtures_paths import unavailable
from tests.utils import REDIS_TEST_DB, REDIS_URL, SettingsFactory, make_client

# live_service, tiny_inputs: one real keyed service for the client, CLI and dashboard tests;
# moto_endpoint, bucket, s3_env: an S3 server (moto) for the object-storage tests;
# production_service, production_env: one launcher on PostgreSQL and Redis for the e2e tests.
pytest_plugins = ["tests.live_service", "tests.object_storage", "tests.production_service"]


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_cnn(tmp_path_factory.mktemp("model") / "teacher.onnx")


@pytest.fixture(scope="session")
def image_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_zip(tmp_path_factory.mktemp("data") / "images.zip")


@pytest.fixture
def make_settings(tmp_path: Path) -> SettingsFactory:
    """Settings on a fresh data directory whose SQLite database Alembic has migrated."""

    def make(**overrides: Any) -> Settings:
        settings = Settings(data_dir=tmp_path / "data", **overrides)
        migrate(settings)
        return settings

    return make


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings()


@pytest.fixture
def session(settings: Settings) -> Iterator[Session]:
    with session_factory(settings)() as session:
        yield session


@pytest.fixture
def client(settings: Settings) -> TestClient:
    return make_client(settings)


PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """URL of a fresh database on the machine's PostgreSQL, dropped afterwards."""
    name = f"sqakd_test_{uuid.uuid4().hex[:12]}"
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


@pytest.fixture(scope="session")
def redis_db() -> Iterator[str]:
    """URL of a database on the machine's Redis; fails in CI / skips where there is none."""
    url = f"{REDIS_URL}/{REDIS_TEST_DB}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError:
        unavailable(f"no Redis at {REDIS_URL}")
    finally:
        client.close()
    yield url


@pytest.fixture
def queue_name(redis_db: str) -> Iterator[str]:
    """A queue no other test session or worker uses; its keys are deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(redis_db)
    try:
        keys = list(client.scan_iter(f"*{name}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
