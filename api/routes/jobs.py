"""/v1/jobs: submit, read, list, cancel, and download artifacts."""

from __future__ import annotations

import base64
import logging
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from api.deps import EnqueueDep, SessionDep, SettingsDep, StorageDep, TenantDep
from api.schemas import (
    ArtifactList,
    ArtifactPublic,
    ErrorBody,
    JobList,
    JobPublic,
    error_responses,
)
from api.uploads import declared_body_bytes, receive_job_upload
from api.validation import ValidationGate
from core import jobs
from core.errors import InputError
from core.intake import validate_isolated
from core.storage import Storage

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

ERRORS = error_responses(
    status.HTTP_401_UNAUTHORIZED, status.HTTP_404_NOT_FOUND, status.HTTP_422_UNPROCESSABLE_CONTENT
)


class BrokerUnavailable(InputError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    responses={
        200: {"model": JobPublic, "description": "Idempotency-Key replay: the original job"},
        413: {"model": ErrorBody},
        415: {"model": ErrorBody},
        429: {"model": ErrorBody, "description": "a quota, or the validation line, is full"},
        503: {"model": ErrorBody},
        **ERRORS,
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["model", "data", "config"],
                        "properties": {
                            "model": {"type": "string", "format": "binary"},
                            "data": {"type": "string", "format": "binary"},
                            "eval_data": {"type": "string", "format": "binary"},
                            "config": {"type": "string", "description": "JobConfig as JSON"},
                        },
                    }
                }
            },
        }
    },
)
async def create_job(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    enqueue: EnqueueDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobPublic:
    """Upload a model (ONNX), an image archive and a config; start quantizing.

    The files stream to disk and are validated (the model is imported and checked against
    ONNX Runtime, in a child process with memory, CPU and time limits) before the job exists:
    a rejected request leaves nothing behind.
    """
    gate: ValidationGate = request.app.state.validation_gate
    gate.check_room()
    await run_in_threadpool(
        jobs.check_quota, session, settings, tenant, incoming_bytes=declared_body_bytes(request)
    )
    # Hold no database connection while the body arrives (minutes, on a slow link): 20 slow
    # uploads would otherwise take the whole pool from every other request.
    await run_in_threadpool(session.commit)
    upload = await receive_job_upload(request, settings)
    try:
        job, created = await gate.run(
            lambda: jobs.submit_job(
                session,
                settings,
                tenant,
                upload,
                lambda staged: validate_isolated(staged, settings),
                idempotency_key,
            )
        )
    except BaseException:
        Storage.remove_tree(upload.directory)  # submit_job removes it too, unless never called
        raise
    if not created:
        response.status_code = status.HTTP_200_OK
        return JobPublic.from_row(job)
    try:
        # After the commit: the worker must find the row the message names.
        await run_in_threadpool(enqueue, job.id)
    except Exception as exc:
        log.exception("job %s: enqueue failed", job.id)
        await run_in_threadpool(jobs.discard_unqueued, session, settings, job.id)
        raise BrokerUnavailable(
            "broker_unavailable", "the job queue is unavailable; try again later"
        ) from exc
    return JobPublic.from_row(job)


@router.get("", response_model=JobList, responses=ERRORS)
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> JobList:
    """The caller's jobs, newest first; pass ``next_cursor`` back as ``cursor`` for more."""
    page = jobs.list_jobs(session, tenant, limit=limit, cursor=cursor)
    return JobList(items=[JobPublic.from_row(j) for j in page.items], next_cursor=page.next_cursor)


@router.get("/{job_id}", response_model=JobPublic, responses=ERRORS)
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobPublic:
    return JobPublic.from_row(jobs.get_job(session, tenant, job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=ERRORS)
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobPublic:
    """Queued: canceled at once. Running: stops at its next step. Finished: unchanged."""
    return JobPublic.from_row(jobs.request_cancel(session, tenant, job_id))


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(status.HTTP_409_CONFLICT) | ERRORS,
)
def delete_job(job_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> None:
    """Delete a queued or finished job with its inputs, work files and artifacts. A running job
    answers 409: cancel it first."""
    jobs.delete_job(session, settings, tenant, job_id)


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=ERRORS)
def list_artifacts(job_id: str, session: SessionDep, tenant: TenantDep) -> ArtifactList:
    job = jobs.get_job(session, tenant, job_id)
    return ArtifactList(items=[ArtifactPublic.model_validate(a) for a in job.artifacts])


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 206: {}, **ERRORS},
)
def download_artifact(
    job_id: str, name: str, session: SessionDep, tenant: TenantDep, storage: StorageDep
) -> FileResponse:
    """The file, streamed from disk; ``Range`` requests are answered with 206."""
    artifact = jobs.get_artifact(session, tenant, job_id, name)
    digest = base64.b64encode(bytes.fromhex(artifact.sha256)).decode()
    return FileResponse(
        storage.absolute(artifact.path),
        filename=artifact.name,
        media_type="application/octet-stream",
        headers={
            "X-Checksum-SHA256": artifact.sha256,
            "Digest": f"sha-256={digest}",  # RFC 3230: base64 of the digest
            "Repr-Digest": f"sha-256=:{digest}:",  # RFC 9530, its successor
            "ETag": f'"{artifact.sha256}"',
        },
    )
