"""/v1/webhooks: signed deliveries of job, sweep and engine events."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
