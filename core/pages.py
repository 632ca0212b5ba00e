"""Cursor pages over any table with ``created_at`` and ``id`` columns, newest first.

Keyset pagination on (created_at, id): a page's cursor is the last row's pair, so inserts and
deletes between two requests neither repeat nor skip rows. Cursors are opaque to clients.
Ids are strings (uuids) or integers (autoincrement keys); a cursor keeps the id's JSON type.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from core.errors import InputError

Row = TypeVar("Row")


@dataclass
class Page(Generic[Row]):
    items: list[Row] = field(default_factory=list)
    next_cursor: str | None = None


RowId = str | int


def encode_cursor(created_at: dt.datetime, row_id: RowId) -> str:
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, id_type: type[RowId] = str) -> tuple[dt.datetime, RowId]:
    """The (created_at, id) pair of a cursor whose id is of ``id_type`` (the table's)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, row_id = json.loads(raw)
        when = dt.datetime.fromisoformat(created_at)
    except (ValueError, TypeError, binascii.Error, RecursionError) as exc:
        raise InputError("invalid_cursor", "cursor is not one this API returned") from exc
    # Ours always carry their offset; a naive one was made by hand. An id of another type
    # (bool is an int too) would compare a column with a value of another type.
    if when.tzinfo is None or type(row_id) is not id_type:
        raise InputError("invalid_cursor", "cursor is not one this API returned")
    return when, row_id


def newest_first(
    session: Session, query: Select[Any], table: Any, *, limit: int, cursor: str | None
) -> Page[Any]:
    """Run ``query`` (a ``select`` of ``table``, filtered) as one page of ``limit`` rows."""
    if cursor is not None:
        created_at, row_id = decode_cursor(cursor, table.id.type.python_type)
        query = query.where(
            or_(
                table.created_at < created_at,
                and_(table.created_at == created_at, table.id < row_id),
            )
        )
    ordered = query.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)
    rows = list(session.scalars(ordered))
    page: Page[Any] = Page(items=rows[:limit])
    if len(rows) > limit:
        last = rows[limit - 1]
        page.next_cursor = encode_cursor(last.created_at, last.id)
    return page
