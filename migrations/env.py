"""Alembic environment: the URL comes from core.settings, never from alembic.ini."""

from __future__ import annotations

import logging
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from core.db import get_engine
from core.models import Base
from core.settings import get_settings

config = context.config
# Programmatic runs (core.db.migrate) keep the host process's logging as it is.
if config.config_file_name is not None and not logging.getLogger().handlers:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    return config.attributes.get("sqlalchemy_url") or get_settings().sqlalchemy_url


def _configure(**kwargs: object) -> None:
    # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=_url().startswith("sqlite"),
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # The service's own engine, so SQLite gets the same WAL/busy_timeout pragmas.
    with get_engine(_url()).connect() as connection:
        if connection.dialect.name != "sqlite":
            _run(connection)
            connection.commit()
            return
        # Batch mode alters a table by dropping and re-creating it; with foreign keys enforced,
        # the drop would run the ON DELETE rules of every table pointing at it (jobs losing
        # their sweep_id, a webhook's messages deleted). The pragma is ignored inside a
        # transaction, so it is set before the migrations' one and restored after (the pool
        # hands this connection out again). Alembic's docs: "Dealing with Referencing Tables".
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        try:
            _run(connection)
            connection.commit()
            if broken := connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall():
                raise RuntimeError(f"migrations left dangling foreign keys: {broken[:5]}")
        finally:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
