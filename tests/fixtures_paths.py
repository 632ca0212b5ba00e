"""Paths into ``../shared`` (fixtures, data), which live beside the repo and are never copied in.

A missing file fails the test in CI, where it must be present, and skips it on a developer
machine that has no ``shared/`` checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DIR = Path(__file__).resolve().parents[1] / ".." / "shared"


def shared_path(*parts: str) -> Path:
    """``../shared/<parts>``, or fail (``CI`` set) / skip (otherwise) when it is missing."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        message = f"shared file missing: {path}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
