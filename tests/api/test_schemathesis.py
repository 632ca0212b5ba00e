"""Schemathesis over /openapi.json: generated requests to every route find no server error.

The app is the real one on a fresh SQLite database and data directory, with an API key (the
production mode; every request carries it) and the machine's Redis as broker, on a queue of its
own that no worker consumes (deleted afterwards). Examples are bounded so the suite stays quick.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from api.main import create_app
from core.db import migrate
from core.settings import Settings
from tests.utils import REDIS_TEST_DB, REDIS_URL

_DATA_DIR = Path(tempfile.mkdtemp(prefix="schemathesis-"))
_KEY = "schemathesis-key-0123456789abcdefghij"
_QUEUE = f"schemathesis-{uuid.uuid4().hex[:12]}"
_SETTINGS = Settings(
    data_dir=_DATA_DIR,
    broker_url=f"{REDIS_URL}/{REDIS_TEST_DB}",
    train_queue=_QUEUE,
    api_keys={_KEY: "fuzz"},
)
migrate(_SETTINGS)


@asynccontextmanager
async def _no_lifespan(_: FastAPI) -> AsyncIterator[None]:
    yield


_APP = create_app(_SETTINGS, sweeper=False)
# Schemathesis runs the app's lifespan around every single call: starting and stopping the
# validation forkserver (which imports torch) took ~10 s a call. Without it, the forkserver
# starts once, on the first upload, and the event streams subscribe on their first use.
_APP.router.lifespan_context = _no_lifespan
schema = schemathesis.openapi.from_asgi("/openapi.json", _APP)


@pytest.fixture(scope="module", autouse=True)
def _delete_queue(redis_db: str) -> Iterator[None]:
    yield
    client = redis.Redis.from_url(redis_db)
    try:
        if keys := list(client.scan_iter(f"*{_QUEUE}*")):
            client.delete(*keys)
    finally:
        client.close()


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_generated_request_is_a_server_error(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {_KEY}"}, checks=[not_a_server_error])
