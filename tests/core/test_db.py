"""core.db helpers that need no database."""

from __future__ import annotations

from core.db import IDS_PER_QUERY, id_batches


def test_id_batches_cover_every_id_once_in_order_within_the_bound() -> None:
    ids = [f"id-{index}" for index in range(2 * IDS_PER_QUERY + 1)]

    batches = list(id_batches(ids))

    assert [len(batch) for batch in batches] == [IDS_PER_QUERY, IDS_PER_QUERY, 1]
    assert [item for batch in batches for item in batch] == ids
    assert list(id_batches([])) == []
