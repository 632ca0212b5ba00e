"""``python -m api.serve``, the Docker image's entrypoint: the exposure check before uvicorn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.utils import REPO_ROOT, SERVICE_ENV, free_port

START_TIMEOUT_S = 90


def entrypoint(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """The entrypoint with a clean environment plus ``env``, as ``docker run -e`` would give."""
    clean = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV}
    return subprocess.Popen(
        [sys.executable, "-m", "api.serve", *args],
        cwd=REPO_ROOT,
        env=clean | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def first_health_answer(process: subprocess.Popen[str], port: int) -> httpx.Response:
    """``/healthz``'s first answer, once the entrypoint serves (it must not exit meanwhile)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "not serving in time"
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        except httpx.TransportError:
            time.sleep(0.2)


@pytest.mark.parametrize("api_keys", [None, "{}"])
def test_keyless_on_all_interfaces_is_refused(tmp_path: Path, api_keys: str | None) -> None:
    env = {"HOST": "0.0.0.0", "PORT": str(free_port()), "SQAKD_DATA_DIR": str(tmp_path)}
    if api_keys is not None:
        env["API_KEYS"] = api_keys
    process = entrypoint(env, "--migrate")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2, output
    assert "API_KEYS must be set to listen on '0.0.0.0'" in output
    assert not list(tmp_path.iterdir())  # refused before migrating: no database made


def test_a_short_key_is_refused_without_printing_it(tmp_path: Path) -> None:
    env = {"HOST": "0.0.0.0", "API_KEYS": '{"hunter2": "team-b"}', "SQAKD_DATA_DIR": str(tmp_path)}
    process = entrypoint(env, "--migrate")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2, output
    assert "'team-b'" in output and "shorter than 32 characters" in output
    assert "hunter2" not in output


@pytest.mark.e2e
def test_keyless_on_loopback_migrates_and_serves(tmp_path: Path) -> None:
    """What the image runs, on 127.0.0.1: migrated SQLite database, /healthz and /readyz' DB."""
    port = free_port()
    env = {"HOST": "127.0.0.1", "PORT": str(port), "SQAKD_DATA_DIR": str(tmp_path)}
    process = entrypoint(env, "--migrate")
    try:
        assert first_health_answer(process, port).status_code == 200
        # The database was migrated (its broker, the embedded socket, is not started here).
        readiness = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()
        assert readiness["checks"]["database"] == "ok"
        # The Host check of keyless mode is on in the served app.
        refused = httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"Host": "evil.example"})
        assert refused.status_code == 403
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    # uvicorn re-raises the signal it stopped on, after a graceful shutdown.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Finished server process" in output


@pytest.mark.e2e
def test_api_processes_serve_one_port_and_stop_together(tmp_path: Path) -> None:
    """API_PROCESSES=2: uvicorn's supervisor with two server processes on the port; SIGTERM
    stops both gracefully."""
    port = free_port()
    env = {"PORT": str(port), "SQAKD_DATA_DIR": str(tmp_path), "API_PROCESSES": "2"}
    process = entrypoint(env, "--migrate")
    try:
        assert first_health_answer(process, port).status_code == 200
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        servers = [
            pid for pid in children
            if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        ]  # fmt: skip
        assert len(servers) == 2, children
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode in (0, -signal.SIGTERM), output
    assert output.count("Finished server process") == 2, output
