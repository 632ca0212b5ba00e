"""Idempotency-Key for creates (jobs, sweeps, webhooks): a retry returns what the first made.

A tenant's key names at most one row of each table (a unique (tenant, idempotency_key)
constraint; rows made without a key hold NULL, which never collides). A create first looks the
key up (``find``) and returns the row it finds; otherwise it inserts with the key. Two requests
with the same key at once may both miss the lookup: the constraint lets one insert win, and
``commit_new`` hands the loser the winner's row instead of an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.models import Job, Sweep, Webhook

# The tables whose rows a create makes under an Idempotency-Key.
Keyed = TypeVar("Keyed", Job, Sweep, Webhook)


def find(session: Session, table: type[Keyed], tenant: str, key: str) -> Keyed | None:
    """The tenant's row made under ``key``; another tenant's key is another key."""
    return session.scalar(select(table).where(table.tenant == tenant, table.idempotency_key == key))


def commit_new(
    session: Session, row: Keyed, add: Callable[[Session, Keyed], None] | None = None
) -> tuple[Keyed, bool]:
    """Add ``row`` (with ``add``, when more than the row belongs in its transaction) and commit:
    (row, True); or, when a concurrent request with the same key committed first, (its row,
    False) and nothing written. Any other IntegrityError is raised."""
    try:
        if add is None:
            session.add(row)
        else:
            add(session, row)
        session.commit()
    except IntegrityError:
        session.rollback()
        key = row.idempotency_key
        existing = find(session, type(row), row.tenant, key) if key is not None else None
        if existing is None:
            raise
        return existing, False
    return row, True
