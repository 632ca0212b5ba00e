"""Each job's event log: what happened to it, in order, kept in the database.

An event is a row of ``job_events`` with a type (``EventType``) and a JSON ``data``. Its ``id``
counts from 1 within the job with no gaps and no reordering: ``record`` takes the next number
from ``jobs.last_event_id`` with an UPDATE, which locks the job's row until the transaction
ends, so events of one job are numbered in the order their transactions commit. A follower
that has seen event ``n`` asks for ``id > n`` and never misses one.

The database is the only source of truth. After a commit that recorded events, the job's id is
published on Redis (the broker, ``job_events_channel``), only to wake followers (the API's
event streams) instead of each polling the database; a publish that fails is logged and lost,
and followers still re-read the database on their heartbeat.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import StrEnum
from functools import lru_cache
from typing import Any

import redis
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from core import webhooks
from core.json_values import json_safe
from core.models import Job, JobEvent, utcnow

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "sqakd:job-events:"
_PENDING = "sqakd.events.pending"  # Session.info key: ids of jobs with uncommitted events
_unannounced = False  # True while Redis refuses this process's announcements


class EventType(StrEnum):
    STATUS = "status"  # {"status", ...}: queued, running (with "attempt"), succeeded, ...
    STAGE = "stage"  # {"stage", "previous", "previous_seconds"}
    PROGRESS = "progress"  # {"step", "total_steps", "epoch", "loss", "eta_seconds", ...}
    METRICS = "metrics"  # a curve point: {"step", "epoch", "loss", "lr", "probe"?: {agreement, kl}}
    WARNING = "warning"  # {"code", "message"}
    ERROR = "error"  # {"code", "message"}
    ENGINE = "engine"  # {"build_id", "target", "status"}


def job_events_channel(job_id: str) -> str:
    return CHANNEL_PREFIX + job_id


def record(session: Session, job_id: str, type: EventType, data: dict[str, Any]) -> int | None:
    """Append an event to the job's log in the session's transaction; the caller commits.

    Returns the event's id, or None when the job does not exist (deleted meanwhile).
    """
    numbered = session.execute(
        update(Job)
        .where(Job.id == job_id)
        # updated_at kept: an event tells of a change, it is not one.
        .values(last_event_id=Job.last_event_id + 1, updated_at=Job.updated_at)
        .returning(Job.last_event_id, Job.tenant)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if numbered is None:
        return None
    event_id, tenant = numbered
    session.add(
        JobEvent(
            job_id=job_id, id=event_id, type=str(type), data=json_safe(data), created_at=utcnow()
        )
    )
    session.info.setdefault(_PENDING, set()).add(job_id)
    _announce_outcome(session, tenant, job_id, type, data)
    return event_id


def _announce_outcome(
    session: Session, tenant: str, job_id: str, type: EventType, data: dict[str, Any]
) -> None:
    """A job's final status and an engine build's outcome go to the tenant's webhooks."""
    status = str(data.get("status"))
    if type == EventType.STATUS and status in ("succeeded", "failed", "canceled"):
        webhooks.announce(session, tenant, f"job.{status}", job_id)
    elif type == EventType.ENGINE and status in ("succeeded", "failed"):
        webhooks.announce(session, tenant, f"engine.{status}", str(data["build_id"]))


def list_events(
    session: Session, job_id: str, *, after: int = 0, limit: int = 100
) -> tuple[Sequence[JobEvent], bool]:
    """Events of a job with ids above ``after``, oldest first: (up to ``limit`` events, more?)."""
    rows = session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.id > after)
        .order_by(JobEvent.id)
        .limit(limit + 1)
    ).all()
    return rows[:limit], len(rows) > limit


# ---------------------------------------------------------------------------------------------
# Wake-ups on Redis


def redis_url(broker_url: str) -> str | None:
    """redis-py's URL for a Celery broker URL; None when the broker is not Redis."""
    if broker_url.startswith("redis+socket://"):
        return "unix://" + broker_url.removeprefix("redis+socket://")
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        return broker_url
    return None


@lru_cache(maxsize=8)
def _publisher(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


@event.listens_for(Session, "after_commit")
def _publish_committed(session: Session) -> None:
    job_ids = session.info.pop(_PENDING, None)
    broker_url = session.info.get("broker_url")
    if not job_ids or not broker_url or (url := redis_url(broker_url)) is None:
        return
    global _unannounced
    try:
        client = _publisher(url)
        for job_id in job_ids:
            client.publish(job_events_channel(job_id), b"")
    except redis.RedisError as exc:
        if not _unannounced:  # once per outage: a training job commits events every step
            log.warning("job events not announced on Redis (%s); followers poll instead", exc)
        _unannounced = True
    else:
        if _unannounced:
            log.info("job events announced on Redis again")
        _unannounced = False


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(_PENDING, None)
