"""/v1/sweeps: one job per configuration of a grid, and a report comparing them."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
