"""/v1/jobs/{id}/events: a job's event log, as JSON pages or Server-Sent Events.

A stream reads the database in short sessions (in the thread pool, no connection held while it
waits), sends what it has not sent, and waits: for the Redis wake-up of its job
(``api.event_stream``), or its heartbeat, which also re-reads the database in case Redis is
away. It ends once it has sent everything of a job whose status is final.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, status
from fastapi.sse import EventSourceResponse, format_sse_event
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep, TenantDep
from api.event_stream import EventWakeups
from api.schemas import JobEventPage, JobEventPublic, error_responses
from core import jobs
from core.db import session_factory
from core.errors import NotFound
from core.settings import Settings

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["events"])

EVENT_STREAM = "text/event-stream"
KEEP_ALIVE = format_sse_event(comment="keep-alive")

SSE_EXAMPLE = (
    'id: 1\nevent: status\ndata: {"id":1,"type":"status","data":{"status":"queued"},'
    '"created_at":"2026-12-06T09:30:00.101000Z"}\n\n'
    'id: 2\nevent: status\ndata: {"id":2,"type":"status","data":{"status":"running",'
    '"attempt":1},"created_at":"2026-12-06T09:30:01.007000Z"}\n\n'
    ": keep-alive\n\n"
)
PAGE_EXAMPLE = {
    "items": [
        {
            "id": 1,
            "type": "status",
            "data": {"status": "queued"},
            "created_at": "2026-12-06T09:30:00.101000Z",
        },
        {
            "id": 2,
            "type": "status",
            "data": {"status": "running", "attempt": 1},
            "created_at": "2026-12-06T09:30:01.007000Z",
        },
    ],
    "has_more": False,
    "job_status": "running",
}


def _read_page(
    settings: Settings, tenant: str, job_id: str, after: int, limit: int
) -> JobEventPage:
    """One page, in a session of its own (a stream must hold no connection while it waits)."""
    with session_factory(settings)() as session:
        page = jobs.job_events(session, tenant, job_id, after=after, limit=limit)
        return JobEventPage(
            items=[JobEventPublic.model_validate(event) for event in page.items],
            has_more=page.has_more,
            job_status=page.job_status,
        )


@router.get(
    "/{job_id}/events",
    response_model=JobEventPage,
    responses={
        200: {
            "description": "With ``Accept: text/event-stream``, Server-Sent Events: one per "
            "event (``id:`` its id, ``event:`` its type, ``data:`` the event as JSON), "
            "``: keep-alive`` comments while the job is quiet; the stream ends when the job "
            "is final. Otherwise a JSON page.",
            "content": {
                "application/json": {"example": PAGE_EXAMPLE},
                EVENT_STREAM: {"schema": {"type": "string"}, "example": SSE_EXAMPLE},
            },
        },
        **error_responses(
            status.HTTP_401_UNAUTHORIZED,
            status.HTTP_404_NOT_FOUND,
            status.HTTP_422_UNPROCESSABLE_CONTENT,
        ),
    },
)
async def job_events(
    request: Request,
    job_id: str,
    settings: SettingsDep,
    tenant: TenantDep,
    after: Annotated[int, Query(ge=0, description="Only events with a larger id.")] = 0,
    limit: Annotated[int, Query(ge=1, le=500, description="Events per page (or per read).")] = 100,
    last_event_id: Annotated[
        int | None,
        Header(ge=0, description="An event stream's reconnect: resume after this id."),
    ] = None,
) -> JobEventPage | EventSourceResponse:
    """The job's event log, oldest first: status and stage changes (each stage with its
    seconds), progress every few seconds, training-curve metrics, warnings, errors and engine
    builds. ``Accept: text/event-stream`` follows it live as Server-Sent Events; a client
    that reconnects with ``Last-Event-ID`` (EventSource does) misses and repeats nothing."""
    if last_event_id is not None:
        after = last_event_id
    # The first page answers 404 for an unknown or foreign job before any stream starts.
    page = await run_in_threadpool(_read_page, settings, tenant, job_id, after, limit)
    if EVENT_STREAM not in request.headers.get("accept", ""):
        return page
    wakeups: EventWakeups = request.app.state.event_wakeups
    stream = _follow(wakeups, settings, tenant, job_id, page, after, limit)
    return EventSourceResponse(
        stream, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


async def _follow(
    wakeups: EventWakeups,
    settings: Settings,
    tenant: str,
    job_id: str,
    page: JobEventPage,
    after: int,
    limit: int,
) -> AsyncIterator[bytes]:
    """Send ``page`` and every later event; end after the last event of a final job."""
    with wakeups.follow(job_id) as woken:
        woken.set()  # events committed since ``page`` was read woke nobody: read once more
        while True:
            for event in page.items:
                yield format_sse_event(
                    id=str(event.id), event=event.type, data_str=event.model_dump_json()
                )
                after = event.id
            if not page.has_more:
                if page.job_status in jobs.FINISHED:
                    return
                try:
                    await asyncio.wait_for(woken.wait(), settings.sse_heartbeat_seconds)
                except TimeoutError:
                    yield KEEP_ALIVE
            woken.clear()  # before the read: a wake-up during it is kept for the next wait
            try:
                page = await run_in_threadpool(_read_page, settings, tenant, job_id, after, limit)
            except NotFound:
                return  # deleted while followed
            except (OperationalError, PoolTimeout) as exc:
                # The database is away for a moment: say nothing, try again on the heartbeat.
                log.warning(
                    "event stream of job %s: read failed: %s",
                    job_id,
                    str(exc).splitlines()[0][:200],
                )
                page = page.model_copy(update={"items": [], "has_more": False})
