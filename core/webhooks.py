"""Webhooks in the Standard Webhooks form (https://www.standardwebhooks.com/).

Stub: the interface other modules call; the delivery machinery is being built.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

EVENT_TYPES = (
    "job.succeeded",
    "job.failed",
    "job.canceled",
    "sweep.completed",
    "engine.succeeded",
    "engine.failed",
)


def announce(session: Session, tenant: str, event_type: str, object_id: str) -> None:
    """Queue a message of ``event_type`` about ``object_id`` for each of the tenant's webhooks
    that subscribed to it, in the session's transaction (the caller commits); they are sent
    after the commit."""
