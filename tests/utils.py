"""Helpers for tests: the app on given settings, and the real launcher as a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import httpx
import uvicorn
from fastapi.testclient import TestClient
from starlette.types import ASGIApp

from api.main import create_app
from core.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379"
REDIS_TEST_DB = 9
# Our own settings, so that the developer's environment cannot leak into a started service.
SERVICE_ENV = (
    "SQAKD_DATA_DIR",
    "DATABASE_URL",
    "BROKER_URL",
    "API_KEYS",
    "TRAIN_QUEUE",
    "HOST",
    "PORT",
    "MAX_MODEL_BYTES",
    "MAX_DATA_BYTES",
    "LEASE_SECONDS",
    "STORAGE_URL",
    "STORAGE_ENDPOINT_URL",
    "STORAGE_DOWNLOAD_REDIRECT",
)

SettingsFactory = Callable[..., Settings]


def make_client(settings: Settings) -> TestClient:
    """The real app on these settings (no recovery sweep: nothing consumes its queue).

    Host ``localhost``, not TestClient's ``testserver``: keyless mode answers only localhost."""
    return TestClient(
        create_app(settings, sweeper=False),
        base_url="http://localhost",
        raise_server_exceptions=False,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_launcher(
    data_dir: Path, port: int, env: dict[str, str], output: IO[bytes] | int
) -> subprocess.Popen[bytes]:
    """``python -m scripts.serve`` with a clean environment plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV}
    return subprocess.Popen(
        [sys.executable, "-m", "scripts.serve", "--port", str(port), "--data-dir", str(data_dir)],
        cwd=REPO_ROOT,
        env=clean | env,
        stdout=output,
        stderr=subprocess.STDOUT,
    )


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 60) -> int:
    """SIGTERM, as Ctrl-C or an orchestrator would; SIGKILL after ``timeout_s``; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def wait_ready(
    url: str, launcher: subprocess.Popen[bytes], timeout_s: float, describe: Callable[[], str]
) -> None:
    """Poll ``/readyz`` until 200; fail with ``describe()`` if the launcher dies or time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert launcher.poll() is None, f"launcher exited:\n{describe()}"
        assert time.monotonic() < deadline, f"not ready after {timeout_s} s:\n{describe()}"
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def children(pid: int) -> dict[int, str]:
    """Direct children of ``pid`` and their command lines (Linux /proc)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            found[int(child)] = cmdline.decode(errors="replace")
    return found


@contextmanager
def served_by_uvicorn(app: ASGIApp, *, lifespan: Literal["auto", "off"] = "auto") -> Iterator[int]:
    """``app`` served by a real uvicorn on a free port, in a thread of this process; the port.

    ``lifespan="off"`` skips the app's startup and shutdown: its shutdown waits up to ~10 s
    for the validation forkserver that its startup warms up."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", lifespan=lifespan))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


@dataclass
class SseMessage:
    """One Server-Sent Event, or a comment (a heartbeat) when ``comment`` is set."""

    id: str | None = None
    event: str | None = None
    data: str | None = None
    comment: str | None = None


def sse_messages(lines: Iterable[str]) -> Iterator[SseMessage]:
    """Messages of an event stream from its lines (``httpx.Response.iter_lines()``), as the
    HTML standard's parser reads them; each comment is a message of its own."""
    message = SseMessage()
    for line in lines:
        if not line:
            if message != SseMessage():
                yield message
            message = SseMessage()
        elif line.startswith(":"):
            yield SseMessage(comment=line[1:].strip())
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                message.data = value if message.data is None else f"{message.data}\n{value}"
            elif field in ("id", "event"):
                setattr(message, field, value)
