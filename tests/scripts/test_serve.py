"""The launcher: when one of its processes dies, it stops the others and exits non-zero."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import children, free_port, start_launcher, wait_ready

pytestmark = pytest.mark.e2e


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_dead_child_stops_the_launcher(tmp_path: Path) -> None:
    port = free_port()
    launcher = start_launcher(tmp_path, port, {}, subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}", launcher, 60, lambda: "see the launcher's output")
        processes = children(launcher.pid)
        assert len(processes) == 4, processes  # redis, worker, webhook worker, api
        (broker,) = [pid for pid, cmd in processes.items() if "redis-server" in cmd]

        os.kill(broker, signal.SIGKILL)

        assert launcher.wait(60) != 0
        assert not [pid for pid in processes if alive(pid)]
        assert not (tmp_path / "redis.sock").exists()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
