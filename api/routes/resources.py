"""models and datasets uploaded once: /v1/models, /v1/datasets."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
