"""One real service for the client, CLI and dashboard tests: ``scripts.serve`` (API, Celery
worker, webhook worker, bundled Redis, SQLite) with an API key, started once per test session.

Tests that use it share its one training worker: keep their jobs tiny (``TINY_CONFIG``).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.factories import CLASSES, VALID_CONFIG, image_zip
from tests.utils import free_port, start_launcher, stop_process, wait_ready

STARTUP_TIMEOUT_S = 90
TENANT = "acme"

# factories.VALID_CONFIG at a fixed 12 steps, without the CPU speed test: trains, evaluates and
# exports in a few seconds on 2 CPU cores.
TINY_CONFIG: dict[str, Any] = {
    **{key: value for key, value in VALID_CONFIG.items() if key != "epochs"},
    "steps": 12,
    "export": {"speed": False},
}


@dataclass(frozen=True)
class LiveService:
    url: str
    api_key: str
    data_dir: Path
    log: Path

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass(frozen=True)
class TinyInputs:
    """A teacher and archives the service accepts: ``CLASSES`` folders of 16x16 PNGs."""

    model: Path
    data: Path
    eval_data: Path
    class_names: tuple[str, ...] = CLASSES


@pytest.fixture(scope="session")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """The whole service on a free port, keyed (tenant ``acme``); SIGTERM after the session."""
    root = tmp_path_factory.mktemp("live-service")
    data_dir, log = root / "data", root / "service.log"
    api_key = secrets.token_urlsafe(32)
    port = free_port()
    env = {"API_KEYS": json.dumps({api_key: TENANT})}
    with log.open("wb") as output:
        launcher = start_launcher(data_dir, port, env, output)
    service = LiveService(f"http://127.0.0.1:{port}", api_key, data_dir, log)
    try:
        wait_ready(service.url, launcher, STARTUP_TIMEOUT_S, service.log_tail)
        yield service
    finally:
        stop_process(launcher)


@pytest.fixture(scope="session")
def tiny_inputs(onnx_model: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyInputs:
    folder = tmp_path_factory.mktemp("tiny-inputs")
    return TinyInputs(
        model=onnx_model,
        data=image_zip(folder / "train.zip", per_class=32),
        eval_data=image_zip(folder / "eval.zip", per_class=8),
    )
