"""Values the database's JSON columns accept."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def json_safe(value: Any) -> Any:
    """JSON the database accepts: NaN and infinities (PostgreSQL refuses them) become null."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy / torch scalars
        return json_safe(value.item())
    if isinstance(value, Iterable):
        return [json_safe(item) for item in value]
    return str(value)
