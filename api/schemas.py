"""Request and response bodies. Responses come from table rows and show only public fields: no
file paths, no lease (a build's lease token goes only to its claimant, in ``EngineClaimed``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.config import TARGET_NAME
from core.engines import engine_queue
from core.events import EventType
from core.jobs import JobStatus
from core.models import EngineBuild, Job


class ErrorDetail(BaseModel):
    code: str
    message: str


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for routes that answer these statuses with an ``ErrorBody``."""
    return {code: {"model": ErrorBody} for code in codes}


class ErrorBody(BaseModel):
    """Every error the API answers: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorDetail


class ArtifactPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    size: int
    sha256: str
    created_at: dt.datetime


class FilePublic(BaseModel):
    size: int
    sha256: str
    id: str | None = None  # the stored model or dataset (/v1/models, /v1/datasets), if any


class JobInputsPublic(BaseModel):
    model: FilePublic
    data: FilePublic
    eval_data: FilePublic | None = None


class EnginePublic(BaseModel):
    """One TensorRT engine of a job (``core.engines``): ``waiting`` until a worker or device
    agent serving ``queue`` claims it; its files are the job's ``engine-<target>.*`` artifacts."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    target: str
    status: str
    queue: str
    builder: str | None
    report: dict[str, Any] | None
    error: ErrorDetail | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @classmethod
    def from_row(cls, build: EngineBuild) -> EnginePublic:
        return cls(
            id=build.id,
            target=build.target,
            status=build.status,
            queue=engine_queue(build.target),
            builder=build.builder,
            report=build.report,
            error=ErrorDetail.model_validate(build.error) if build.error else None,
            created_at=build.created_at,
            started_at=build.started_at,
            finished_at=build.finished_at,
        )


class EngineClaim(BaseModel):
    """A device agent's request for work: the target it builds for, and what it runs."""

    target: str = Field(pattern=f"^{TARGET_NAME.pattern}$")
    agent: str = Field("device-agent", max_length=100)
    tensorrt_version: str | None = Field(None, max_length=50)
    device: dict[str, Any] = Field(default_factory=dict)


class EngineClaimed(BaseModel):
    build: EnginePublic
    model_url: str  # model_qdq.onnx, relative to the API's base URL
    lease_seconds: int
    # The claim's secret: send it as X-Lease-Token to renew the lease and to report the result.
    lease_token: str


class EngineLease(BaseModel):
    """A renewed lease: the builder holds the build until ``lease_expires_at``."""

    build_id: str
    lease_seconds: int
    lease_expires_at: dt.datetime


class EngineFailure(BaseModel):
    code: str = Field("build_failed", max_length=64)
    message: str = Field(max_length=4000)


class JobPublic(BaseModel):
    id: str
    status: JobStatus
    stage: str | None
    progress: dict[str, Any] | None
    metrics: dict[str, Any] | None
    error: ErrorDetail | None
    artifacts: list[ArtifactPublic]
    engines: list[EnginePublic]  # TensorRT engines asked for with export.tensorrt_targets
    config: dict[str, Any]
    inputs: JobInputsPublic
    cancel_requested: bool
    attempts: int  # deliveries that ran the job; more than 1 after a worker died
    metadata: dict[str, str]  # the user's own strings, given at submission
    sweep_id: str | None  # the sweep that made the job, if any
    stage_seconds: dict[str, float]  # seconds spent in each finished stage
    latest_metrics: dict[str, Any] | None  # the newest training-curve point (events: metrics)
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @classmethod
    def from_row(cls, job: Job) -> JobPublic:
        eval_data = (
            FilePublic(size=job.eval_data_size, sha256=job.eval_data_sha256, id=job.eval_data_id)
            if job.eval_data_size is not None and job.eval_data_sha256 is not None
            else None
        )
        return cls(
            id=job.id,
            status=JobStatus(job.status),
            stage=job.stage,
            progress=job.progress,
            metrics=job.metrics,
            error=ErrorDetail.model_validate(job.error) if job.error else None,
            artifacts=[ArtifactPublic.model_validate(a) for a in job.artifacts],
            engines=[EnginePublic.from_row(build) for build in job.engines],
            config=job.config,
            inputs=JobInputsPublic(
                model=FilePublic(size=job.model_size, sha256=job.model_sha256, id=job.model_id),
                data=FilePublic(size=job.data_size, sha256=job.data_sha256, id=job.data_id),
                eval_data=eval_data,
            ),
            cancel_requested=job.cancel_requested,
            attempts=job.attempts,
            metadata=job.user_metadata or {},
            sweep_id=job.sweep_id,
            stage_seconds=job.stage_seconds or {},
            latest_metrics=job.latest_metrics,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class JobList(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None


class ArtifactList(BaseModel):
    items: list[ArtifactPublic]


class JobEventPublic(BaseModel):
    """One entry of a job's event log; ``id`` counts from 1 within the job, without gaps. The
    ``data`` of each type: ``status`` {status, attempt (running), error (failed), reason
    (queued again: worker_lost), stage_seconds (final)}; ``stage`` {stage, previous,
    previous_seconds}; ``progress`` {step, total_steps, epoch, loss, eta_seconds,
    images_per_second, ...}; ``metrics`` a training-curve point; ``warning`` and ``error``
    {code, message}; ``engine`` {build_id, target, status, error}."""

    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": 3,
                    "type": "stage",
                    "data": {
                        "stage": "calibrating",
                        "previous": "validating",
                        "previous_seconds": 1.4,
                    },
                    "created_at": "2026-12-06T09:30:02.512000Z",
                }
            ]
        },
    )

    id: int
    type: EventType
    data: dict[str, Any]
    created_at: dt.datetime


class JobEventPage(BaseModel):
    """Events after ``after``, oldest first; ``has_more``: ask again with the last id. A job
    whose ``job_status`` is final and ``has_more`` false has nothing more to tell (but engine
    builds of a succeeded job, which come later)."""

    items: list[JobEventPublic]
    has_more: bool
    job_status: JobStatus


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]
