"""SQLAlchemy engine and sessions built from the settings, and the Alembic upgrade.

SQLite (the embedded default) is written by two processes at once, the API and the worker, so
every connection uses WAL (readers never block the writer) and a busy timeout (a writer waits
for the other's lock instead of failing with "database is locked").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings, get_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Connections a process may hold: more than the API's 40 threadpool threads. A request keeps
# its session's connection until its answer is sent; with SQLAlchemy's 5 + 10 a burst left
# every connection with answers the event loop had yet to send while all 40 threads waited
# for one, and one API process answered nothing for a minute (bench.api_load).
POOL_SIZE, POOL_OVERFLOW = 10, 50
# Ids bound in one IN (...) list: PostgreSQL binds at most 65,535 parameters a query, SQLite
# 32,766 (999 before 3.32), and a long-lived service has more jobs than either.
IDS_PER_QUERY = 500


def id_batches(ids: Sequence[str], size: int = IDS_PER_QUERY) -> Iterator[Sequence[str]]:
    """``ids`` in slices of at most ``size``: one IN list each."""
    for first in range(0, len(ids), size):
        yield ids[first : first + size]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; fsync per checkpoint only
    cursor.close()


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One engine (and pool) per database URL per process."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # The driver's own transaction handling stays on purpose: it sends BEGIN only before a
        # write, so reads take no lock and hold no snapshot, and a write never has to upgrade
        # a read lock (which fails at once with SQLITE_BUSY instead of waiting). Our writes
        # that must be atomic are single UPDATE statements.
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=POOL_SIZE,
            max_overflow=POOL_OVERFLOW,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)


def engine_for(settings: Settings | None = None) -> Engine:
    return get_engine((settings or get_settings()).sqlalchemy_url)


@lru_cache(maxsize=8)
def _sessionmaker(url: str, broker_url: str) -> sessionmaker[Session]:
    # expire_on_commit=False: rows returned by service functions stay readable after commit.
    # The broker's URL rides along in ``Session.info``: core.events publishes on it, after a
    # commit, that a job has new events.
    return sessionmaker(get_engine(url), expire_on_commit=False, info={"broker_url": broker_url})


def session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    settings = settings or get_settings()
    return _sessionmaker(settings.sqlalchemy_url, settings.celery_broker_url)


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """A session for one unit of work outside a request (worker, scripts); rolls back on error."""
    with session_factory(settings)() as session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise


def alembic_config(settings: Settings | None = None) -> Any:
    from alembic.config import Config

    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    # env.py reads this instead of get_settings(), so a caller can migrate any database.
    config.attributes["sqlalchemy_url"] = (settings or get_settings()).sqlalchemy_url
    return config


def migrate(settings: Settings | None = None) -> None:
    """``alembic upgrade head`` on the settings' database: the only way the schema is made."""
    from alembic import command

    command.upgrade(alembic_config(settings), "head")
