"""What tests need from outside the repo: ``../shared`` (fixtures, data) and local services.

Something missing fails the test in CI, where it must be present, and skips it on a developer
machine without it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

SHARED_DIR = Path(__file__).resolve().parents[1] / ".." / "shared"


def shared_path(*parts: str) -> Path:
    """``../shared/<parts>``, or fail (``CI`` set) / skip (otherwise) when it is missing."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        unavailable(f"shared file missing: {path}")
    return path


def unavailable(message: str) -> NoReturn:
    """Fail in CI (``CI`` set), where everything must be there; skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
