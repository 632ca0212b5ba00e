"""/v1/jobs/{id}/events: a job's event log, as JSON pages or Server-Sent Events."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
