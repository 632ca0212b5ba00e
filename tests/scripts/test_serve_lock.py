"""One launcher per data directory: a second is refused, and none removes another's socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from tests.factories import VALID_CONFIG, post_job
from tests.utils import children, free_port, start_launcher, stop_process, wait_ready

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(sys.platform != "linux", reason="flock and /proc semantics of Linux"),
]

STARTUP_TIMEOUT_S = 90
REFUSED_EXIT_CODE = 2


@dataclass
class Launcher:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        return stop_process(self.process)


@pytest.fixture
def launchers() -> Iterator[list[Launcher]]:
    """Launchers a test starts; any still running afterwards is stopped."""
    started: list[Launcher] = []
    yield started
    for launcher in started:
        launcher.stop()


def launch(data_dir: Path, started: list[Launcher]) -> Launcher:
    port = free_port()
    log = data_dir.parent / f"launcher-{len(started)}.log"
    with log.open("wb") as output:
        process = start_launcher(data_dir, port, {}, output)
    launcher = Launcher(process, f"http://127.0.0.1:{port}", log)
    started.append(launcher)
    return launcher


def launch_when_free(data_dir: Path, started: list[Launcher]) -> tuple[Launcher, int]:
    """Start launchers until one is not refused for the lock; it, and how many were refused."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    refused = 0
    while True:
        launcher = launch(data_dir, started)
        while launcher.process.poll() is None:
            try:
                if httpx.get(f"{launcher.url}/readyz", timeout=5).status_code == 200:
                    return launcher, refused
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready in time:\n{launcher.output()}"
            time.sleep(0.1)
        assert launcher.process.returncode == REFUSED_EXIT_CODE, launcher.output()
        assert f"data directory {data_dir} is in use by another launcher" in launcher.output()
        refused += 1
        assert time.monotonic() < deadline, "the lock was never released"


def wait_for_status(api: httpx.Client, job_id: str, status: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while (job := api.get(f"/v1/jobs/{job_id}").json())["status"] != status:
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def ping(socket_path: Path) -> bool:
    client = redis.Redis(unix_socket_path=str(socket_path), socket_connect_timeout=2)
    try:
        return bool(client.ping())
    finally:
        client.close()


def test_a_second_launcher_is_refused_while_the_first_serves(
    tmp_path: Path, launchers: list[Launcher]
) -> None:
    data_dir = tmp_path / "data"
    first = launch(data_dir, launchers)
    wait_ready(first.url, first.process, STARTUP_TIMEOUT_S, first.output)

    second = launch(data_dir, launchers)

    assert second.process.wait(60) == REFUSED_EXIT_CODE, second.output()
    message = f"data directory {data_dir} is in use by another launcher (pid {first.process.pid};"
    assert message in second.output()
    assert "started redis" not in second.output()  # refused before it touched anything
    assert ping(data_dir / "redis.sock")
    readiness = httpx.get(f"{first.url}/readyz", timeout=10).json()
    assert readiness["checks"]["broker"] == "ok", readiness
    assert first.stop() == 0, first.output()
    assert not (data_dir / "redis.sock").exists()


def test_a_launcher_started_while_the_last_one_stops_keeps_its_broker(
    tmp_path: Path, launchers: list[Launcher], onnx_model: Path, image_archive: Path
) -> None:
    """The measured race: ``make serve`` again right after stopping one. The stopping one used
    to unlink the new one's socket (it and its redis-server), and the new one's first job was
    answered 503 ``broker_unavailable``."""
    data_dir = tmp_path / "data"
    first = launch(data_dir, launchers)
    wait_ready(first.url, first.process, STARTUP_TIMEOUT_S, first.output)
    # A running job keeps the first one's worker busy, so that stopping takes seconds (its
    # warm stop): the window in which the second one used to start its own redis-server.
    with httpx.Client(base_url=first.url, timeout=60) as api:
        long_config = VALID_CONFIG | {"epochs": 1000}
        response = post_job(api, model=onnx_model, data=image_archive, config=long_config)
        assert response.status_code == 202, response.text
        long_job = response.json()["id"]
        wait_for_status(api, long_job, "running")

    first.process.send_signal(signal.SIGTERM)
    second, refused = launch_when_free(data_dir, launchers)

    assert first.process.wait(60) == 0, first.output()
    assert ping(data_dir / "redis.sock")
    with httpx.Client(base_url=second.url, timeout=60) as api:
        response = post_job(api, model=onnx_model, data=image_archive)
        assert response.status_code == 202, response.text
        for job_id in (long_job, response.json()["id"]):  # no training needed
            api.post(f"/v1/jobs/{job_id}/cancel")
    assert second.stop() == 0, second.output()
    assert refused >= 1  # the first one held the data directory until it had stopped


def test_a_launcher_leaves_a_socket_it_did_not_make(
    tmp_path: Path, launchers: list[Launcher]
) -> None:
    """Its redis-server dies (SIGKILL: no cleanup of its own) after another socket has taken
    its path: the launcher stops, and leaves that socket where it is."""
    data_dir = tmp_path / "data"
    launcher = launch(data_dir, launchers)
    wait_ready(launcher.url, launcher.process, STARTUP_TIMEOUT_S, launcher.output)
    socket_path = data_dir / "redis.sock"
    socket_path.rename(data_dir / "redis-moved.sock")
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(socket_path))
        (broker,) = [
            p for p, cmd in children(launcher.process.pid).items() if "redis-server" in cmd
        ]

        os.kill(broker, signal.SIGKILL)

        assert launcher.process.wait(60) != 0
        assert "redis exited" in launcher.output()
        assert socket_path.exists()
        assert socket_path.stat().st_ino == os.stat(other.getsockname()).st_ino


def test_a_killed_launcher_releases_the_data_directory(
    tmp_path: Path, launchers: list[Launcher]
) -> None:
    """SIGKILL: the OS drops the lock once the launcher and its redis-server (which it stops
    through PR_SET_PDEATHSIG) are gone; the next launcher then serves."""
    data_dir = tmp_path / "data"
    first = launch(data_dir, launchers)
    wait_ready(first.url, first.process, STARTUP_TIMEOUT_S, first.output)

    first.process.kill()
    first.process.wait()
    second, _ = launch_when_free(data_dir, launchers)

    assert ping(data_dir / "redis.sock")
    assert second.stop() == 0, second.output()
