"""/v1/jobs: submit, read, list, cancel, and download artifacts."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import EnqueueDep, SessionDep, SettingsDep, StorageDep, TenantDep
from api.downloads import stored_download
from api.schemas import (
    ArtifactList,
    ArtifactPublic,
    ErrorBody,
    IdempotencyKey,
    JobList,
    JobPublic,
    error_responses,
)
from api.uploads import (
    CONFIG_MAX_BYTES,
    METADATA_MAX_BYTES,
    declared_body_bytes,
    receive_job_upload,
    receive_json,
)
from api.validation import ValidationGate
from core import jobs, resources, sweeps
from core.errors import InputError
from core.intake import validate_isolated
from core.jobs import JobStatus
from core.models import Job
from core.resources import ResourceJobRequest
from core.settings import Settings
from core.storage import Storage

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# A JSON job: its config and metadata at their caps, plus the ids.
JOB_JSON_MAX_BYTES = CONFIG_MAX_BYTES + METADATA_MAX_BYTES + 1024

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
                "application/json": {"schema": ResourceJobRequest.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["model", "data", "config"],
                        "properties": {
                            "model": {"type": "string", "format": "binary"},
                            "data": {"type": "string", "format": "binary"},
                            "eval_data": {"type": "string", "format": "binary"},
                            "config": {"type": "string", "description": "JobConfig as JSON"},
                            "metadata": {
                                "type": "string",
                                "description": "the job's metadata: a JSON object of strings "
                                '(at most 16), e.g. {"experiment": "w4a4"}',
                            },
                        },
                    }
                },
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
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Start quantizing: from a stored model and dataset (JSON), or from files (multipart).

    JSON (`Content-Type: application/json`): `model_id` and `data_id` name a model and dataset
    stored with `POST /v1/models` and `/v1/datasets` (`eval_data_id` optionally, a labelled
    dataset), with the `config` and optional `metadata`; the job shares their files.

    Multipart: the files `model` (ONNX) and `data` (image archive), `config` as a JSON string,
    optionally `eval_data` and `metadata`. The files stream to disk and are validated (the
    model is imported and checked against ONNX Runtime, in a child process with memory, CPU and
    time limits) before the job exists: a rejected request leaves nothing behind.
    """
    media_type = _media_type(request)
    if media_type == "application/json":
        body = await receive_json(request, ResourceJobRequest, JOB_JSON_MAX_BYTES)
        job, created = await run_in_threadpool(
            resources.submit_job, session, settings, tenant, body, idempotency_key
        )
    elif media_type == "multipart/form-data":
        job, created = await _submit_upload(request, session, settings, tenant, idempotency_key)
    else:
        raise InputError(
            "unsupported_media_type",
            "send application/json (model_id, data_id and config: stored resources) or "
            "multipart/form-data (the files model and data, and config)",
            status_code=status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        )
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


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


async def _submit_upload(
    request: Request,
    session: Session,
    settings: Settings,
    tenant: str,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    """The multipart branch of ``POST /v1/jobs``: stream, validate in the isolated child, and
    create the job (``core.jobs.submit_job``)."""
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
    return job, created


@router.get(
    "",
    response_model=JobList,
    responses=ERRORS,
    openapi_extra={
        "parameters": [
            {
                "name": "metadata",
                "in": "query",
                "required": False,
                "style": "deepObject",
                "explode": True,
                "description": "only jobs whose metadata holds each pair: "
                "`metadata[experiment]=w4a4&metadata[owner]=ana`",
                "schema": {"type": "object", "additionalProperties": {"type": "string"}},
            }
        ]
    },
)
def list_jobs(
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
    statuses: Annotated[
        list[str] | None,
        Query(
            alias="status",
            description="only jobs in one of these statuses (queued, running, succeeded, "
            "failed, canceled): repeat the parameter or separate them by commas",
            examples=["queued,running"],
        ),
    ] = None,
) -> JobList:
    """The caller's jobs, newest first; pass ``next_cursor`` back as ``cursor`` for more (with
    the same filters)."""
    page = jobs.list_jobs(
        session,
        tenant,
        limit=limit,
        cursor=cursor,
        statuses=_statuses(statuses or []),
        metadata=_metadata_filter(request),
    )
    return JobList(items=[JobPublic.from_row(j) for j in page.items], next_cursor=page.next_cursor)


def _statuses(values: list[str]) -> list[JobStatus]:
    """``?status=queued&status=running`` and ``?status=queued,running`` alike."""
    wanted = []
    for value in (part.strip() for text in values for part in text.split(",")):
        if not value:
            continue
        try:
            wanted.append(JobStatus(value))
        except ValueError:
            raise InputError(
                "invalid_status",
                f"status {value[:50]!r} is none of {', '.join(JobStatus)}",
            ) from None
    return wanted


def _metadata_filter(request: Request) -> dict[str, str]:
    """``metadata[key]=value`` query parameters (Stripe's form) as {key: value}."""
    return {
        name[len("metadata[") : -1]: value
        for name, value in request.query_params.multi_items()
        if name.startswith("metadata[") and name.endswith("]")
    }


@router.get("/{job_id}", response_model=JobPublic, responses=ERRORS)
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobPublic:
    return JobPublic.from_row(jobs.get_job(session, tenant, job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=ERRORS)
def cancel_job(
    job_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> JobPublic:
    """Queued: canceled at once. Running: stops at its next step. Finished: unchanged."""
    job = jobs.request_cancel(session, tenant, job_id)
    sweeps.finish_sweep_of(session, settings, job.sweep_id)  # a queued job was its last
    return JobPublic.from_row(job)


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
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {},
        307: {"description": "with STORAGE_DOWNLOAD_REDIRECT: the file at a presigned URL"},
        **ERRORS,
    },
)
def download_artifact(
    job_id: str,
    name: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    storage: StorageDep,
) -> Response:
    """The file, streamed; ``Range`` requests are answered with 206. With object storage and
    ``STORAGE_DOWNLOAD_REDIRECT``, a 307 to a presigned URL of the bucket instead."""
    artifact = jobs.get_artifact(session, tenant, job_id, name)
    return stored_download(
        request,
        storage,
        artifact.path,
        name=artifact.name,
        size=artifact.size,
        sha256=artifact.sha256,
        redirect=settings.storage_download_redirect,
    )
