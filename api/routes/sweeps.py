"""/v1/sweeps: one job per configuration of a grid, and a report comparing them."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from api.deps import EnqueueDep, SessionDep, SettingsDep, StorageDep, TenantDep
from api.downloads import stored_download
from api.schemas import (
    ErrorBody,
    IdempotencyKey,
    SweepCreate,
    SweepList,
    SweepPublic,
    error_responses,
)
from api.uploads import receive_json
from core import sweeps

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])

SWEEP_JSON_MAX_BYTES = 256 * 1024  # a base config and up to MAX_SWEEP_JOBS configs, metadata
ERRORS = error_responses(
    status.HTTP_401_UNAUTHORIZED, status.HTTP_404_NOT_FOUND, status.HTTP_422_UNPROCESSABLE_CONTENT
)
MEDIA_TYPES = {"report.html": "text/html; charset=utf-8", "pareto.svg": "image/svg+xml"}
# A report opened from the API's origin runs nothing: no script, no outside request.
REPORT_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "img-src data:; sandbox",
    "X-Content-Type-Options": "nosniff",
}


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=SweepPublic,
    responses={
        200: {"model": SweepPublic, "description": "Idempotency-Key replay: the original sweep"},
        413: {"model": ErrorBody, "description": "the body, or the tenant's storage quota"},
        429: {"model": ErrorBody, "description": "the tenant's active jobs would pass its quota"},
        **ERRORS,
    },
    # The body is read by receive_json (bounded before it is parsed), not declared: say it.
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": SweepCreate.model_json_schema()}},
        }
    },
)
async def create_sweep(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    enqueue: EnqueueDep,
    idempotency_key: IdempotencyKey = None,
) -> SweepPublic:
    """Start one job per configuration: a ``grid`` (tied keys advance together, ``weight_bits``
    and ``activation_bits`` by default; the other keys multiply) or a ``configs`` list, each
    deep-merged over ``base_config``, on a stored model and dataset.

    Every configuration is validated and the quotas checked before any job exists: a bad one
    is a 422 naming it, and nothing is created. At most ``MAX_SWEEP_JOBS`` configurations
    (422 ``sweep_too_large``). When every job is final the sweep stores ``report.html`` and
    ``pareto.svg``. A job the queue did not take stays queued: the API's recovery loop sends
    it again.

    With an ``Idempotency-Key`` the tenant already made a sweep with, the answer is that sweep
    as it is now, with 200 instead of 202, and no job is made or sent again.
    """
    body = await receive_json(request, SweepCreate, SWEEP_JSON_MAX_BYTES)

    def create_and_enqueue() -> tuple[SweepPublic, bool]:
        sweep, created = sweeps.create_sweep(
            session,
            settings,
            tenant,
            model_id=body.model_id,
            data_id=body.data_id,
            eval_data_id=body.eval_data_id,
            base_config=body.base_config,
            grid=body.grid,
            tie=body.tie,
            configs=body.configs,
            metadata=body.metadata,
            idempotency_key=idempotency_key,
        )
        view = sweeps.describe(sweep)
        # A replay's jobs were sent by the first request (or are the recovery loop's to send).
        jobs_to_send = sweep.jobs if created else []
        for job in jobs_to_send:  # after the commit: the worker must find the row
            try:
                enqueue(job.id)
            except Exception:  # noqa: BLE001 - kombu raises many types; the job stays queued
                log.warning(
                    "sweep %s: job %s not enqueued; the recovery loop will", sweep.id, job.id
                )
        return SweepPublic.from_view(view), created

    public, created = await run_in_threadpool(create_and_enqueue)
    if not created:
        response.status_code = status.HTTP_200_OK
    return public


@router.get("", response_model=SweepList, responses=ERRORS)
def list_sweeps(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> SweepList:
    """The caller's sweeps, newest first; pass ``next_cursor`` back as ``cursor`` for more."""
    page = sweeps.list_sweeps(session, tenant, limit=limit, cursor=cursor)
    return SweepList(
        items=[SweepPublic.from_view(sweeps.describe(s)) for s in page.items],
        next_cursor=page.next_cursor,
    )


@router.get("/{sweep_id}", response_model=SweepPublic, responses=ERRORS)
def get_sweep(sweep_id: str, session: SessionDep, tenant: TenantDep) -> SweepPublic:
    """The sweep: its jobs' counts by status, one row per job (configuration, status,
    agreement, top-1, packed size, int8 latency, on the Pareto front or not), and its report's
    artifacts once every job is final."""
    return SweepPublic.from_view(sweeps.describe(sweeps.get_sweep(session, tenant, sweep_id)))


@router.post("/{sweep_id}/cancel", response_model=SweepPublic, responses=ERRORS)
def cancel_sweep(
    sweep_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> SweepPublic:
    """Cancel its jobs: queued ones at once, running ones at their next step. The report of
    what finished is stored when the last one stops."""
    return SweepPublic.from_view(
        sweeps.describe(sweeps.cancel_sweep(session, settings, tenant, sweep_id))
    )


@router.delete(
    "/{sweep_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(status.HTTP_409_CONFLICT) | ERRORS,
)
def delete_sweep(
    sweep_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> None:
    """Delete the sweep with its jobs (their inputs' own copies, work files and artifacts) and
    its report. While one of its jobs runs: 409 ``sweep_running``, cancel it first."""
    sweeps.delete_sweep(session, settings, tenant, sweep_id)


@router.get(
    "/{sweep_id}/artifacts/{name}",
    response_class=FileResponse,
    responses={
        200: {"content": {"text/html": {}, "image/svg+xml": {}}},
        206: {},
        **ERRORS,
    },
)
def download_sweep_artifact(
    sweep_id: str,
    name: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    storage: StorageDep,
) -> Response:
    """``report.html`` or ``pareto.svg``, once every job of the sweep is final (404 before).
    Always through the API, never redirected: the report's headers keep it inert."""
    key, artifact = sweeps.get_artifact(session, settings, tenant, sweep_id, name)
    return stored_download(
        request,
        storage,
        key,
        name=artifact["name"],
        size=artifact["size"],
        sha256=artifact["sha256"],
        media_type=MEDIA_TYPES.get(artifact["name"], "application/octet-stream"),
        headers=REPORT_HEADERS,
    )
