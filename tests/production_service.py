"""The whole service as ``python -m scripts.serve`` starts it, and one production-like instance
of it (PostgreSQL + the machine's Redis) shared by the end-to-end tests that only submit jobs
to it (tests/test_e2e.py, test_engines_e2e.py, test_events_e2e.py): its worker's start (it
imports torch: 5 to 15 s on 2 busy cores) is paid once per session, not once per test.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis

from tests.fixtures_paths import unavailable
from tests.utils import (
    REDIS_TEST_DB,
    REDIS_URL,
    free_port,
    start_launcher,
    stop_process,
    wait_ready,
)

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
STARTUP_TIMEOUT_S = 90


@dataclass
class Service:
    url: str
    data_dir: Path
    log: Path
    pid: int  # the launcher's

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def running_service(data_dir: Path, env: dict[str, str]) -> Iterator[Service]:
    """``python -m scripts.serve`` on a free port until /readyz; stopped with SIGTERM after."""
    port = free_port()
    log = data_dir.parent / f"{data_dir.name}.log"
    with log.open("wb") as output:
        launcher = start_launcher(data_dir, port, env, output)
    service = Service(f"http://127.0.0.1:{port}", data_dir, log, launcher.pid)
    try:
        wait_ready(service.url, launcher, STARTUP_TIMEOUT_S, service.log_tail)
        yield service
    finally:
        code = stop_process(launcher)
        assert code == 0, f"launcher exited with {code}:\n{service.log_tail()}"


@pytest.fixture(scope="session")
def production_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this session, dropped afterwards."""
    name = f"sqakd_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        unavailable(f"no PostgreSQL at 127.0.0.1:5432: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def production_env(production_database: str) -> Iterator[dict[str, str]]:
    """PostgreSQL plus the machine's Redis, on a queue of our own (other sessions share it)."""
    queue = f"train-e2e-{uuid.uuid4().hex[:12]}"
    client = redis.Redis.from_url(f"{REDIS_URL}/{REDIS_TEST_DB}", socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError:
        unavailable(f"no Redis at {REDIS_URL}")
    yield {
        "DATABASE_URL": production_database,
        "BROKER_URL": f"{REDIS_URL}/{REDIS_TEST_DB}",
        "TRAIN_QUEUE": queue,
        # A progress event every half second, not every 5: test_events_e2e follows a job's
        # stream and drops it mid-training.
        "PROGRESS_EVENT_SECONDS": "0.5",
    }
    keys = list(client.scan_iter(f"*{queue}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def production_service(
    production_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """The service on PostgreSQL and Redis, for the session: tests that share it only add jobs
    (of their own) to it; none stops, kills or reconfigures any of its processes."""
    with running_service(tmp_path_factory.mktemp("service-production"), production_env) as service:
        yield service
