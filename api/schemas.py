"""Request and response bodies, and the Idempotency-Key header of creates. Responses come from
table rows and show only public fields: no file paths, no lease (a build's lease token goes
only to its claimant, in ``EngineClaimed``), no idempotency key."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import Header
from pydantic import BaseModel, ConfigDict, Field

from core.config import TARGET_NAME
from core.engines import engine_queue
from core.events import EventType
from core.jobs import JobStatus, Metadata
from core.models import EngineBuild, Job
from core.sweep_table import SweepView

# POST /v1/jobs, /v1/sweeps and /v1/webhooks (core.idempotency); at most what the column holds.
IdempotencyKey = Annotated[
    str | None,
    Header(
        max_length=200,
        description="Your key for this create: a retry with the same key (same API key's "
        "tenant) answers 200 with what the first request made, and makes nothing new.",
    ),
]


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


JOB_EXAMPLE: dict[str, Any] = {
    "id": "3f2a9c1e-8b7d-4e6f-a5c4-1d2e3f4a5b6c",
    "status": "running",
    "stage": "training",
    "progress": {
        "step": 120,
        "total_steps": 782,
        "epoch": 1,
        "epochs": 1,
        "loss": 0.0841,
        "eta_seconds": 212.4,
        "images_per_second": 198.6,
    },
    "metrics": None,
    "error": None,
    "artifacts": [],
    "engines": [],
    "config": {"weight_bits": 4, "activation_bits": 4, "method": "lsq", "epochs": 1},
    "inputs": {
        "model": {
            "size": 1120412,
            "sha256": "9f8e...c2",
            "id": "5b0e7c1a-2f4d-4c7e-9a51-0d6f3b8e2c11",
        },
        "data": {
            "size": 96820411,
            "sha256": "47ab...e1",
            "id": "9c3f1e20-7a6b-4d85-b1e2-4f0a6c9d8e73",
        },
        "eval_data": None,
    },
    "cancel_requested": False,
    "attempts": 1,
    "metadata": {"experiment": "w4-lsq"},
    "sweep_id": None,
    "stage_seconds": {"validating": 3.1, "calibrating": 41.7},
    "latest_metrics": {
        "step": 120,
        "epoch": 1,
        "loss": 0.0863,
        "lr": {"weights": 0.0021, "quantizer": 0.0019},
        "probe": {"agreement": 0.93, "kl": 0.041, "images": 100},
    },
    "created_at": "2026-12-06T09:00:00Z",
    "updated_at": "2026-12-06T09:01:05Z",
    "started_at": "2026-12-06T09:00:02Z",
    "finished_at": None,
}


class JobPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

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


class ImageSizeSeen(BaseModel):
    width: int
    height: int
    count: int  # images of this size in the sample


class ModelInfo(BaseModel):
    """What a stored model's validation found (it was imported and checked against ONNX
    Runtime as a job's model is)."""

    input_name: str
    input_shape: list[int | str | None] = Field(
        description="[N, 3, H, W]; a dynamic dimension is null: a job then names its "
        "preprocessing.input_size"
    )
    num_outputs: int | None = Field(description="class scores the model outputs (null: dynamic)")
    opset: int
    parameters: int


class DatasetInfo(BaseModel):
    """What a stored dataset's validation found, from the archive's member list and the
    headers of a sample of its images (nothing is decoded)."""

    archive_format: str  # zip | tar
    image_count: int
    image_bytes: int  # uncompressed bytes of the images
    class_names: list[str] | None = Field(
        description="the model outputs the class folders label, in order (README, the data); "
        "null: not labelled"
    )
    formats: dict[str, int]  # images by file extension
    image_sizes: list[ImageSizeSeen] = Field(
        description="distinct sizes in the sample, most common first (at most 10)"
    )
    images_sampled: int  # images whose header was read, evenly spread (at most 1,000)
    unreadable_in_sample: int  # sampled files whose header is no JPEG, PNG or WebP
    source_url: str | None = Field(
        None, description="s3://bucket/key it was registered from; null: uploaded"
    )


class ResourcePublic(BaseModel):
    """A model (``/v1/models``) or dataset (``/v1/datasets``) stored once, for any number of
    jobs: name it in ``POST /v1/jobs`` as JSON (``model_id``, ``data_id``, ``eval_data_id``)."""

    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": "5b0e7c1a-2f4d-4c7e-9a51-0d6f3b8e2c11",
                    "kind": "model",
                    "filename": "resnet18.onnx",
                    "sha256": "9f2c5e0b7d1a4c3e8b6f0a2d4c6e8f1a3b5d7c9e0f2a4b6c8d0e1f3a5b7c9d1e",
                    "size": 44_700_000,
                    "created_at": "2026-12-06T09:30:00Z",
                    "info": {
                        "input_name": "input",
                        "input_shape": [None, 3, 224, 224],
                        "num_outputs": 1000,
                        "opset": 17,
                        "parameters": 11_689_512,
                    },
                },
                {
                    "id": "9c3f1e20-7a6b-4d85-b1e2-4f0a6c9d8e73",
                    "kind": "dataset",
                    "filename": "train.zip",
                    "sha256": "3e1f5a7c9b0d2e4f6a8c0b1d3f5e7a9c2b4d6f8e0a1c3e5f7b9d0c2e4a6f8b1d",
                    "size": 4_718_592,
                    "created_at": "2026-12-06T09:31:00Z",
                    "info": {
                        "archive_format": "zip",
                        "image_count": 1437,
                        "image_bytes": 4_600_000,
                        "class_names": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
                        "formats": {"png": 1437},
                        "image_sizes": [{"width": 16, "height": 16, "count": 1000}],
                        "images_sampled": 1000,
                        "unreadable_in_sample": 0,
                    },
                },
            ]
        },
    )

    id: str
    kind: Literal["model", "dataset"]
    filename: str | None  # the client's file name, for display only
    sha256: str
    size: int
    created_at: dt.datetime
    info: ModelInfo | DatasetInfo


class ResourceList(BaseModel):
    items: list[ResourcePublic]
    next_cursor: str | None


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]


# ---------------------------------------------------------------------------------------------
# Sweeps

SWEEP_ID_EXAMPLE = "3f6d2a10-8c4b-4e7a-9d15-2b7e0c9a4f68"


class SweepCreate(BaseModel):
    """``POST /v1/sweeps``: one job per configuration, over stored resources. Give ``grid``
    (tied keys advance together, the others multiply) or an explicit ``configs`` list."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_id": "5b0e7c1a-2f4d-4c7e-9a51-0d6f3b8e2c11",
                    "data_id": "9c3f1e20-7a6b-4d85-b1e2-4f0a6c9d8e73",
                    "eval_data_id": "1d7e4b92-3c5a-4f60-8e2d-6a9b0c1f7e45",
                    "base_config": {"epochs": 3, "batch_size": 64},
                    "grid": {"weight_bits": [8, 4, 2], "activation_bits": [8, 4, 2]},
                    "metadata": {"experiment": "bit-widths"},
                },
                {
                    "model_id": "5b0e7c1a-2f4d-4c7e-9a51-0d6f3b8e2c11",
                    "data_id": "9c3f1e20-7a6b-4d85-b1e2-4f0a6c9d8e73",
                    "base_config": {"epochs": 3},
                    "configs": [
                        {"weight_bits": 4, "activation_bits": 8},
                        {"weight_bits": 4, "activation_bits": 4, "method": "ewgs"},
                    ],
                },
            ]
        },
    )

    model_id: str = Field(max_length=36, description="A stored model (POST /v1/models).")
    data_id: str = Field(max_length=36, description="A stored dataset (POST /v1/datasets).")
    eval_data_id: str | None = Field(
        None, max_length=36, description="A stored dataset labelled by class folders, for top-1."
    )
    base_config: dict[str, Any] = Field(
        default_factory=dict, description="What every job's config starts from (README)."
    )
    grid: dict[str, list[Any]] | None = Field(
        None,
        max_length=16,
        description="Config field -> values; a dotted key reaches a nested field "
        "(preprocessing.augment). Each point is deep-merged over base_config.",
    )
    tie: list[str] | None = Field(
        None,
        max_length=16,
        description="Grid keys that advance together (lists of one length); the others form "
        "the cartesian product. Default: weight_bits and activation_bits, where the grid has "
        "them; [] ties nothing.",
    )
    configs: list[dict[str, Any]] | None = Field(
        None, description="Instead of grid: each entry deep-merged over base_config."
    )
    metadata: Metadata | None = Field(
        None, description="The sweep's own strings; each job gets them too, with sweep_id."
    )


class SweepRowPublic(BaseModel):
    """One job of a sweep, as the table shows it."""

    job_id: str
    label: str = Field(description='The configuration in short: "W4A4 lsq".')
    config: dict[str, Any] = Field(description="The job's values of the sweep's grid keys.")
    status: JobStatus
    agreement: float | None = Field(description="Teacher/student top-1 agreement, 0..1.")
    student_top1: float | None = Field(description="Top-1 on the labelled images, 0..1.")
    packed_bytes: int | None = Field(description="Weights at their bit-width (metrics).")
    int8_latency_ms: float | None = Field(
        description="model_qdq_cpu.onnx under OpenVINO on the worker's CPU, batch 1, ms per "
        "image (metrics.inference); null where not measured."
    )
    error: ErrorDetail | None
    pareto: bool = Field(description="On the Pareto front of packed size and pareto_metric.")


class SweepPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": SWEEP_ID_EXAMPLE,
                    "status": "completed",
                    "counts": {
                        "queued": 0,
                        "running": 0,
                        "succeeded": 2,
                        "failed": 0,
                        "canceled": 0,
                    },
                    "rows": [
                        {
                            "job_id": "0a4f2c6e-1b3d-4e5f-8a7b-9c0d1e2f3a4b",
                            "label": "W8A8 lsq",
                            "config": {"weight_bits": 8, "activation_bits": 8},
                            "status": "succeeded",
                            "agreement": 0.997,
                            "student_top1": 0.989,
                            "packed_bytes": 25_412,
                            "int8_latency_ms": 0.21,
                            "error": None,
                            "pareto": True,
                        },
                        {
                            "job_id": "7e1d3b5f-2a4c-4d6e-9f8a-0b1c2d3e4f5a",
                            "label": "W4A4 lsq",
                            "config": {"weight_bits": 4, "activation_bits": 4},
                            "status": "succeeded",
                            "agreement": 0.991,
                            "student_top1": 0.986,
                            "packed_bytes": 14_131,
                            "int8_latency_ms": 0.2,
                            "error": None,
                            "pareto": True,
                        },
                    ],
                    "pareto_metric": "student_top1",
                    "recommended_job_id": "7e1d3b5f-2a4c-4d6e-9f8a-0b1c2d3e4f5a",
                    "artifacts": [
                        {
                            "name": "report.html",
                            "size": 21_034,
                            "sha256": "5d41402abc4b2a76b9719d911017c592"
                            "5d41402abc4b2a76b9719d911017c592",
                            "created_at": "2026-12-06T10:02:11Z",
                        },
                        {
                            "name": "pareto.svg",
                            "size": 6_120,
                            "sha256": "7d793037a0760186574b0282f2f435e7"
                            "7d793037a0760186574b0282f2f435e7",
                            "created_at": "2026-12-06T10:02:11Z",
                        },
                    ],
                    "model_id": "5b0e7c1a-2f4d-4c7e-9a51-0d6f3b8e2c11",
                    "data_id": "9c3f1e20-7a6b-4d85-b1e2-4f0a6c9d8e73",
                    "eval_data_id": "1d7e4b92-3c5a-4f60-8e2d-6a9b0c1f7e45",
                    "base_config": {"epochs": 3},
                    "grid": {"weight_bits": [8, 4], "activation_bits": [8, 4]},
                    "tie": None,
                    "configs": None,
                    "metadata": {"experiment": "bit-widths"},
                    "cancel_requested": False,
                    "created_at": "2026-12-06T09:58:40Z",
                    "completed_at": "2026-12-06T10:02:11Z",
                }
            ]
        }
    )

    id: str
    status: Literal["running", "completed", "canceled"] = Field(
        description="running while a job is queued or running, then completed; canceled once "
        "a cancel was asked for."
    )
    counts: dict[str, int] = Field(description="The sweep's jobs by status.")
    rows: list[SweepRowPublic]
    pareto_metric: Literal["student_top1", "agreement"] = Field(
        description="The accuracy of the front: student_top1 where every succeeded job has "
        "it (labelled images), else agreement."
    )
    recommended_job_id: str | None = Field(
        description="The smallest front job within 1 point of the best accuracy."
    )
    artifacts: list[ArtifactPublic] = Field(
        description="report.html and pareto.svg, once every job is final."
    )
    model_id: str | None
    data_id: str | None
    eval_data_id: str | None
    base_config: dict[str, Any]
    grid: dict[str, list[Any]] | None
    tie: list[str] | None
    configs: list[dict[str, Any]] | None
    metadata: dict[str, str]
    cancel_requested: bool
    created_at: dt.datetime
    completed_at: dt.datetime | None = Field(description="When the report was stored.")

    @classmethod
    def from_view(cls, view: SweepView) -> SweepPublic:
        sweep, table = view.sweep, view.table
        request = sweep.request
        return cls(
            id=sweep.id,
            status=table.status,  # type: ignore[arg-type]
            counts=table.counts,
            rows=[
                SweepRowPublic(
                    job_id=row.job_id,
                    label=row.label,
                    config=row.config,
                    status=JobStatus(row.status),
                    agreement=row.agreement,
                    student_top1=row.student_top1,
                    packed_bytes=row.packed_bytes,
                    int8_latency_ms=row.int8_latency_ms,
                    error=ErrorDetail.model_validate(row.error) if row.error else None,
                    pareto=row.pareto,
                )
                for row in table.rows
            ],
            pareto_metric=table.pareto_metric,  # type: ignore[arg-type]
            recommended_job_id=table.recommended.job_id if table.recommended else None,
            artifacts=[ArtifactPublic.model_validate(a) for a in sweep.artifacts or []],
            model_id=sweep.model_id,
            data_id=sweep.data_id,
            eval_data_id=sweep.eval_data_id,
            base_config=request.get("base_config", {}),
            grid=request.get("grid"),
            tie=request.get("tie"),
            configs=request.get("configs"),
            metadata=sweep.user_metadata or {},
            cancel_requested=sweep.cancel_requested,
            created_at=sweep.created_at,
            completed_at=sweep.completed_at,
        )


class SweepList(BaseModel):
    items: list[SweepPublic]
    next_cursor: str | None
