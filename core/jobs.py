"""Jobs: states, transitions, leases and progress; the service functions the API and worker call.

States: ``queued -> running -> succeeded | failed | canceled`` (a queued job may also go straight
to ``canceled``). While ``running``, ``stage`` is one of ``core.pipeline.STAGES``.

The database is the source of truth; the broker only carries job ids. A worker must *claim* a
job before running it: one atomic UPDATE that succeeds only for a queued job, or a running job
whose lease expired (its worker died). The claimant owns the lease and renews it with every
progress write and a heartbeat; every later write of the worker names the owner in its WHERE
clause, so a worker that lost its lease can no longer change the job. Hence a redelivered
message never trains a job twice at once, and a finished job is never run again.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, StringConstraints, TypeAdapter, ValidationError
from sqlalchemy import ColumnElement, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from core import events, idempotency
from core.config import JobConfig
from core.db import id_batches
from core.errors import InputError, NotFound, QuotaExceeded, TooLargeError
from core.json_values import json_safe
from core.models import Artifact, Job, JobEvent, Resource, utcnow
from core.pages import Page, newest_first
from core.settings import Settings
from core.storage import StoredFile, StoredObject, human_bytes, open_storage

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Claims per job: a job that kills its worker this often is failed instead of retried."""


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


FINISHED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class ArtifactNotFound(InputError):
    status_code = 404

    def __init__(self, job_id: str, name: str) -> None:
        super().__init__("artifact_not_found", f"job {job_id!r} has no artifact {name!r}")


# ---------------------------------------------------------------------------------------------
# Submitting


@dataclass
class JobUpload:
    """What one request handed over: a staging folder with its files, and the raw config."""

    directory: Path
    config_text: str
    model: StoredFile
    data: StoredFile
    eval_data: StoredFile | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # the user's own strings

    @property
    def size(self) -> int:
        files = (self.model, self.data, self.eval_data)
        return sum(file.size for file in files if file is not None)


def parse_config(text: str) -> JobConfig:
    """The job config from its JSON text; errors name the offending field."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise InputError("invalid_config", f"config is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # the C scanner recurses once per nesting level
        raise InputError("invalid_config", "config is nested too deeply") from exc
    return validate_config(raw)


def validate_config(raw: object) -> JobConfig:
    """The job config from its parsed JSON (a JSON request's ``config``); 422 invalid_config."""
    if not isinstance(raw, dict):
        raise InputError("invalid_config", "config must be a JSON object")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise InputError("invalid_config", describe_validation_error(exc, "config")) from exc


# A job's ``metadata``: the user's own strings, bounded as OpenAI bounds its objects' metadata.
# Keys keep to a plain alphabet: the list filter looks them up as JSON paths (SQLite's
# JSON_EXTRACT cannot name every key).
MAX_METADATA_KEYS = 16
METADATA_KEY_PATTERN = r"^[A-Za-z0-9_.:/-]{1,64}$"
MAX_METADATA_VALUE_CHARS = 512
Metadata = Annotated[
    dict[
        Annotated[str, StringConstraints(pattern=METADATA_KEY_PATTERN)],
        # No NUL: PostgreSQL's text (and its JSON ->> operator) cannot hold one.
        Annotated[
            str, StringConstraints(max_length=MAX_METADATA_VALUE_CHARS, pattern=r"^[^\x00]*$")
        ],
    ],
    Field(
        max_length=MAX_METADATA_KEYS,
        description=f"Up to {MAX_METADATA_KEYS} strings of up to {MAX_METADATA_VALUE_CHARS} "
        "characters, by keys of 1..64 letters, digits and _ . : / -; GET /v1/jobs filters by "
        "them (metadata[key]=value).",
        examples=[{"experiment": "resnet18-w4", "owner": "ana"}],
    ),
]
_METADATA = TypeAdapter(Metadata)


def validate_metadata(raw: object) -> dict[str, str]:
    """A job's metadata map, or 422 invalid_metadata naming what is wrong."""
    try:
        return _METADATA.validate_python(raw)
    except ValidationError as exc:
        raise InputError("invalid_metadata", describe_validation_error(exc, "metadata")) from exc


def parse_metadata(text: str) -> dict[str, str]:
    """A job's metadata from its JSON text (the multipart field ``metadata``)."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InputError("invalid_metadata", "metadata is not a JSON object of strings") from exc
    return validate_metadata(raw)


def describe_validation_error(exc: ValidationError, prefix: str) -> str:
    """'config.weight_bits: Input should be less than or equal to 8; ...' (first 5 problems)."""
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in (prefix, *error["loc"]))
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems)


def submit_job(
    session: Session,
    settings: Settings,
    tenant: str,
    upload: JobUpload,
    validate: Callable[[JobUpload], JobConfig],
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Validate an upload with ``validate`` and create its queued job; returns (job, created).

    On any error, and when ``idempotency_key`` names an existing job (returned with created
    False), the upload's files are deleted and no row is written. The caller enqueues the job
    after this returns, that is after the commit, and deletes it again if the broker refuses
    (``discard_unqueued``), so that a retry with the same key submits anew.
    """
    storage = open_storage(settings)
    adopted: str | None = None  # the key of the job's inputs
    committed = False
    try:
        if idempotency_key is not None and (
            existing := find_by_idempotency_key(session, tenant, idempotency_key)
        ):
            return existing, False
        session.commit()  # no connection held while validating (seconds to minutes)
        config = validate(upload)
        check_quota(session, settings, tenant, incoming_bytes=upload.size)
        job_id = str(uuid.uuid4())
        adopted = storage.adopt(upload.directory, storage.inputs_key(job_id))

        def stored(file: StoredFile) -> str:
            return f"{adopted}/{file.path.name}"

        job = Job(
            id=job_id,
            tenant=tenant,
            idempotency_key=idempotency_key,
            status=JobStatus.QUEUED,
            config=config.model_dump(mode="json"),
            model_path=stored(upload.model),
            model_sha256=upload.model.sha256,
            model_size=upload.model.size,
            data_path=stored(upload.data),
            data_sha256=upload.data.sha256,
            data_size=upload.data.size,
            user_metadata=upload.metadata,
            cancel_requested=False,
            attempts=0,
            enqueued_at=utcnow(),
        )
        if upload.eval_data is not None:
            job.eval_data_path = stored(upload.eval_data)
            job.eval_data_sha256 = upload.eval_data.sha256
            job.eval_data_size = upload.eval_data.size
        job, created = commit_new_job(session, job)
        committed = created
        return job, created
    finally:
        # Whatever a committed job did not adopt is garbage now.
        storage.remove_tree(upload.directory)
        if adopted is not None and not committed:
            storage.remove(adopted)


def add_job(session: Session, job: Job) -> None:
    """Add a new queued job to the session with its first event; the caller commits.

    Every way of making a job (multipart, JSON, a sweep) goes through here, so that every
    job's event log starts with ``queued``.
    """
    session.add(job)
    session.flush()  # the row must exist for its event to be numbered
    events.record(session, job.id, events.EventType.STATUS, {"status": JobStatus.QUEUED})


def commit_new_job(session: Session, job: Job) -> tuple[Job, bool]:
    """``add_job`` and commit: (job, True); or, when a concurrent request with the same
    Idempotency-Key won the race, (its job, False) and nothing written."""
    return idempotency.commit_new(session, job, add_job)


def find_by_idempotency_key(session: Session, tenant: str, key: str) -> Job | None:
    return idempotency.find(session, Job, tenant, key)


ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
QUOTA_RETRY_AFTER_S = 60


def stored_bytes(session: Session, tenant: str) -> int:
    """Bytes the tenant keeps on disk: its stored models and datasets (each once, however many
    jobs use them), the inputs of jobs that own theirs (multipart) not yet deleted, and
    artifacts."""
    resources = session.scalar(
        select(func.coalesce(func.sum(Resource.size), 0)).where(Resource.tenant == tenant)
    )
    own_inputs = session.scalar(
        select(
            func.coalesce(
                func.sum(Job.model_size + Job.data_size + func.coalesce(Job.eval_data_size, 0)), 0
            )
        ).where(
            Job.tenant == tenant,
            Job.inputs_deleted_at.is_(None),
            Job.model_id.is_(None),  # a job made from stored resources names their files
            Job.data_id.is_(None),
        )
    )
    artifacts = session.scalar(
        select(func.coalesce(func.sum(Artifact.size), 0)).join(Job).where(Job.tenant == tenant)
    )
    return int(resources or 0) + int(own_inputs or 0) + int(artifacts or 0)


def check_quota(
    session: Session, settings: Settings, tenant: str, *, incoming_bytes: int, new_jobs: int = 1
) -> None:
    """Refuse ``new_jobs`` new jobs (a sweep makes several) beyond the tenant's quotas: 429
    (active jobs) or 413 (stored bytes).

    Checked before the body is read (``incoming_bytes`` from Content-Length) and again with the
    real sizes. Two uploads racing can both pass; the next one is refused.
    """
    active = session.scalar(
        select(func.count()).where(Job.tenant == tenant, Job.status.in_(ACTIVE))
    )
    if (active or 0) + new_jobs > settings.max_active_jobs_per_tenant:
        adding = f"; {new_jobs} more would pass it" if new_jobs > 1 else ""
        raise QuotaExceeded(
            "too_many_active_jobs",
            f"{active} jobs are queued or running, the limit of this API key's tenant is "
            f"{settings.max_active_jobs_per_tenant}{adding}; retry when one has finished",
            headers={"Retry-After": str(QUOTA_RETRY_AFTER_S)},
        )
    check_storage_quota(session, settings, tenant, incoming_bytes=incoming_bytes)


def check_storage_quota(
    session: Session, settings: Settings, tenant: str, *, incoming_bytes: int
) -> None:
    """413 when ``incoming_bytes`` more would pass the tenant's stored-bytes quota (a job's
    upload, or a model or dataset to store)."""
    used = stored_bytes(session, tenant)
    if used + incoming_bytes > settings.max_stored_bytes_per_tenant:
        raise TooLargeError(
            "storage_quota_exceeded",
            f"this tenant stores {human_bytes(used)}; {human_bytes(incoming_bytes)} more would "
            f"pass its quota of {human_bytes(settings.max_stored_bytes_per_tenant)}: "
            "delete finished jobs (DELETE /v1/jobs/{id}) or stored models and datasets "
            "(DELETE /v1/models/{id}, /v1/datasets/{id})",
        )


def discard_unqueued(session: Session, settings: Settings, job_id: str) -> None:
    """Delete a job the broker refused, row and files: the client is told to retry (503), and
    its retry, with or without the same Idempotency-Key, submits anew."""
    session.execute(delete(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED))
    session.commit()
    open_storage(settings).remove_job_files(job_id)


# ---------------------------------------------------------------------------------------------
# Reading


def get_job(session: Session, tenant: str, job_id: str) -> Job:
    """The tenant's job; another tenant's job is as unknown as a missing one."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant == tenant))
    if job is None:
        raise NotFound("job", job_id)
    return job


def list_jobs(
    session: Session,
    tenant: str,
    *,
    limit: int = 20,
    cursor: str | None = None,
    statuses: Iterable[JobStatus] = (),
    metadata: dict[str, str] | None = None,
) -> Page[Job]:
    """The tenant's jobs, newest first, ``limit`` at a time (see ``core.pages``); only those in
    one of ``statuses`` (when given) whose metadata holds every pair of ``metadata``."""
    query = select(Job).where(Job.tenant == tenant)
    if wanted := list(statuses):
        query = query.where(Job.status.in_(wanted))
    for key, value in validate_metadata(metadata or {}).items():
        # JSON element comparison, the same on SQLite (JSON_EXTRACT) and PostgreSQL (->>).
        query = query.where(Job.user_metadata[key].as_string() == value)
    return newest_first(session, query, Job, limit=limit, cursor=cursor)


@dataclass
class EventPage:
    job_status: JobStatus
    items: Sequence[JobEvent]
    has_more: bool


def job_events(
    session: Session, tenant: str, job_id: str, *, after: int = 0, limit: int = 100
) -> EventPage:
    """The tenant's job's events with ids above ``after``, oldest first, ``limit`` at a time.

    The status is read before the events: when it is final, the events of the transaction
    that made it final are in this page or, with ``has_more``, in the next ones.
    """
    status = session.scalar(select(Job.status).where(Job.id == job_id, Job.tenant == tenant))
    if status is None:
        raise NotFound("job", job_id)
    items, has_more = events.list_events(session, job_id, after=after, limit=limit)
    return EventPage(JobStatus(status), items, has_more)


def get_artifact(session: Session, tenant: str, job_id: str, name: str) -> Artifact:
    job = get_job(session, tenant, job_id)
    for artifact in job.artifacts:
        if artifact.name == name:
            return artifact
    raise ArtifactNotFound(job_id, name)


def count_by_status(session: Session) -> dict[str, int]:
    counts = dict.fromkeys(JobStatus, 0)
    for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status)):
        counts[JobStatus(status)] = count
    return {str(status): count for status, count in counts.items()}


# ---------------------------------------------------------------------------------------------
# Canceling


def request_cancel(session: Session, tenant: str, job_id: str) -> Job:
    """Cancel a queued job at once; flag a running one (its worker stops at the next step).

    Canceling a finished job changes nothing, so a client may repeat the call safely.
    """
    get_job(session, tenant, job_id)  # 404 for unknown and foreign jobs
    now = utcnow()
    canceled = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELED, cancel_requested=True, finished_at=now, updated_at=now)
    )
    if canceled.rowcount == 1:  # type: ignore[attr-defined]
        events.record(session, job_id, events.EventType.STATUS, {"status": JobStatus.CANCELED})
    else:  # a running job's worker stops at its next step, and records ``canceled`` then
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
            .values(cancel_requested=True, updated_at=now)
        )
    session.commit()
    session.expire_all()
    return get_job(session, tenant, job_id)


class JobRunning(InputError):
    status_code = 409

    def __init__(self, job_id: str) -> None:
        super().__init__(
            "job_running",
            f"job {job_id!r} is running: cancel it (POST /v1/jobs/{job_id}/cancel) and delete "
            "it once it has stopped",
        )


def delete_job(session: Session, settings: Settings, tenant: str, job_id: str) -> None:
    """Delete a job that is not running: its row, engine builds, inputs, work and artifacts.

    A queued job goes at once (a message still on its way finds no row to claim). The row goes
    first: files left by a crash in between belong to no job, and the orphan sweep takes them.
    """
    get_job(session, tenant, job_id)  # 404 for unknown and foreign jobs
    deleted = session.execute(
        delete(Job).where(Job.id == job_id, Job.tenant == tenant, Job.status != JobStatus.RUNNING)
    )
    session.commit()
    if deleted.rowcount == 0:  # type: ignore[attr-defined]
        raise JobRunning(job_id)
    open_storage(settings).remove_job_files(job_id)


def is_cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


# ---------------------------------------------------------------------------------------------
# Leases (worker side). Every write names the owner: a worker that lost its lease changes nothing.


def _lease_until(lease_seconds: int, now: dt.datetime | None = None) -> dt.datetime:
    return (now or utcnow()) + dt.timedelta(seconds=lease_seconds)


def claim_job(
    session: Session, job_id: str, owner: str, lease_seconds: int, *, now: dt.datetime | None = None
) -> Job | None:
    """Take the lease of a queued job, or of a running one whose lease expired; None otherwise.

    The claim and its ``running`` event (with the attempt's number) are one transaction.
    """
    now = now or utcnow()
    attempt = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            or_(
                Job.status == JobStatus.QUEUED,
                and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now),
            ),
            Job.attempts < MAX_ATTEMPTS,
        )
        .values(
            status=JobStatus.RUNNING,
            stage=None,  # until the worker reports its first stage (a retry starts over)
            lease_owner=owner,
            lease_expires_at=_lease_until(lease_seconds, now),
            attempts=Job.attempts + 1,
            started_at=func.coalesce(Job.started_at, now),
            updated_at=now,
        )
        .returning(Job.attempts)
    ).scalar_one_or_none()
    if attempt is None:
        session.rollback()
        return None
    events.record(
        session, job_id, events.EventType.STATUS, {"status": JobStatus.RUNNING, "attempt": attempt}
    )
    session.commit()
    return session.get(Job, job_id, populate_existing=True)


JobEventData = tuple[events.EventType, dict[str, Any]]


def _owned(job_id: str, owner: str) -> ColumnElement[bool]:
    """The WHERE clause of every write of a worker: the job runs under its lease."""
    return and_(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING)


def _owned_write(
    session: Session,
    job_id: str,
    owner: str,
    values: dict[str, Any],
    *,
    now: dt.datetime,
    recorded: Sequence[JobEventData] = (),
) -> bool:
    """One write of the lease's owner and the events it tells of, in one transaction.

    The UPDATE comes first and takes the row's lock: when it finds the lease gone (False),
    the transaction is rolled back, so a worker that lost its job records nothing.
    """
    result = session.execute(
        update(Job).where(_owned(job_id, owner)).values(updated_at=now, **values)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return False
    for event_type, data in recorded:
        events.record(session, job_id, event_type, data)
    session.commit()
    return True


def _owned_stage(session: Session, job_id: str, owner: str) -> tuple[str | None, dict] | None:
    """(stage, stage_seconds) of a job ``owner`` runs, locked on PostgreSQL until the commit
    (on SQLite the UPDATE that follows takes the lock); None when the lease is gone.

    Only the owner writes these two columns, so what is read here is still true when its
    owned UPDATE succeeds.
    """
    row = session.execute(
        select(Job.stage, Job.stage_seconds).where(_owned(job_id, owner)).with_for_update()
    ).one_or_none()
    if row is None:
        session.rollback()
        return None
    return row.stage, dict(row.stage_seconds or {})


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def _with_seconds(
    stage_seconds: dict[str, float], stage: str | None, seconds: float | None
) -> dict[str, float]:
    """``stage_seconds`` with ``seconds`` more in ``stage``: a job resumed after its worker died
    adds the second attempt's time to the first's."""
    if stage is None or seconds is None:
        return stage_seconds
    return stage_seconds | {stage: round(stage_seconds.get(stage, 0.0) + seconds, 1)}


def renew_lease(session: Session, job_id: str, owner: str, lease_seconds: int) -> bool:
    """Heartbeat; False when the lease was lost (expired and taken, or the job finished)."""
    now = utcnow()
    return _owned_write(
        session, job_id, owner, {"lease_expires_at": _lease_until(lease_seconds, now)}, now=now
    )


def report_stage(
    session: Session,
    job_id: str,
    owner: str,
    stage: str,
    lease_seconds: int,
    *,
    previous_seconds: float | None = None,
) -> bool:
    """The job entered ``stage``; the stage it left took ``previous_seconds`` (the worker's
    monotonic clock), added to ``stage_seconds``. Event: ``stage``."""
    now = utcnow()
    current = _owned_stage(session, job_id, owner)
    if current is None:
        return False
    previous, stage_seconds = current
    values = {
        "stage": stage,
        "stage_seconds": _with_seconds(stage_seconds, previous, previous_seconds),
        "lease_expires_at": _lease_until(lease_seconds, now),
    }
    data = {"stage": stage, "previous": previous, "previous_seconds": _rounded(previous_seconds)}
    return _owned_write(
        session, job_id, owner, values, now=now, recorded=[(events.EventType.STAGE, data)]
    )


def report_progress(
    session: Session,
    job_id: str,
    owner: str,
    progress: dict[str, Any],
    lease_seconds: int,
    *,
    event: bool = False,
) -> bool:
    """The job row's progress; with ``event``, also an event of type ``progress`` (the worker
    writes the row every half second, the event every ``progress_event_seconds``)."""
    now = utcnow()
    progress = json_safe(progress)
    values = {"progress": progress, "lease_expires_at": _lease_until(lease_seconds, now)}
    recorded = [(events.EventType.PROGRESS, progress)] if event else []
    return _owned_write(session, job_id, owner, values, now=now, recorded=recorded)


def report_metrics(session: Session, job_id: str, owner: str, point: dict[str, Any]) -> bool:
    """A training-curve point: an event of type ``metrics``, and the job's ``latest_metrics``."""
    point = json_safe(point)
    return _owned_write(
        session,
        job_id,
        owner,
        {"latest_metrics": point},
        now=utcnow(),
        recorded=[(events.EventType.METRICS, point)],
    )


def report_warning(session: Session, job_id: str, owner: str, code: str, message: str) -> bool:
    """Something the user should know that does not fail the job: an event of type ``warning``."""
    data = {"code": code, "message": message}
    return _owned_write(
        session, job_id, owner, {}, now=utcnow(), recorded=[(events.EventType.WARNING, data)]
    )


def record_artifact(session: Session, job_id: str, stored: StoredObject) -> None:
    """Record (or, on a rerun, replace) one stored artifact of a job."""
    name = stored.name
    session.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    session.add(
        Artifact(
            job_id=job_id,
            name=name,
            path=stored.key,
            size=stored.size,
            sha256=stored.sha256,
        )
    )
    session.commit()


def _finish(
    session: Session,
    job_id: str,
    owner: str,
    status: JobStatus,
    values: dict[str, Any],
    *,
    last_stage_seconds: float | None,
    error: dict[str, str] | None = None,
) -> bool:
    """End a job ``owner`` runs: its status, the last stage's seconds, and the events (an
    ``error`` first for a failure, then the final ``status`` with ``stage_seconds``)."""
    now = utcnow()
    current = _owned_stage(session, job_id, owner)
    finished = False
    if current is not None:
        stage, stage_seconds = current
        stage_seconds = _with_seconds(stage_seconds, stage, last_stage_seconds)
        status_event: dict[str, Any] = {"status": status}
        recorded: list[JobEventData] = []
        if error is not None:
            recorded.append((events.EventType.ERROR, error))
            status_event["error"] = error
            values = values | {"error": error}
        recorded.append((events.EventType.STATUS, status_event | {"stage_seconds": stage_seconds}))
        finished = _owned_write(
            session,
            job_id,
            owner,
            {
                "status": status,
                "stage_seconds": stage_seconds,
                "finished_at": now,
                "lease_owner": None,
                "lease_expires_at": None,
            }
            | values,
            now=now,
            recorded=recorded,
        )
    if not finished:
        log.warning("job %s: lease of %s lost before it could be marked %s", job_id, owner, status)
    return finished


def succeed(
    session: Session,
    job_id: str,
    owner: str,
    metrics: dict[str, Any],
    *,
    last_stage_seconds: float | None = None,
) -> bool:
    return _finish(
        session,
        job_id,
        owner,
        JobStatus.SUCCEEDED,
        {"metrics": json_safe(metrics), "stage": None},
        last_stage_seconds=last_stage_seconds,
    )


def fail(
    session: Session,
    job_id: str,
    owner: str,
    code: str,
    message: str,
    *,
    last_stage_seconds: float | None = None,
) -> bool:
    return _finish(
        session,
        job_id,
        owner,
        JobStatus.FAILED,
        {},
        last_stage_seconds=last_stage_seconds,
        error={"code": code, "message": message},
    )


def cancel(
    session: Session, job_id: str, owner: str, *, last_stage_seconds: float | None = None
) -> bool:
    """The worker stopped a job whose cancel was requested."""
    return _finish(
        session, job_id, owner, JobStatus.CANCELED, {}, last_stage_seconds=last_stage_seconds
    )


# ---------------------------------------------------------------------------------------------
# Recovery


def requeue_expired(session: Session, *, now: dt.datetime | None = None) -> list[str]:
    """Put running jobs whose lease expired (their worker died) back in the queue.

    Returns their ids, to be enqueued again; a job that used up ``MAX_ATTEMPTS`` fails instead.
    Clearing the owner makes a worker that was only stalled, not dead, lose the job. Each job
    changed gets its events in the same transaction: ``queued`` (reason ``worker_lost``), or an
    ``error`` and ``failed``.
    """
    now = now or utcnow()
    expired = and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
    error = {
        "code": "worker_lost",
        "message": f"the worker running this job stopped {MAX_ATTEMPTS} times",
    }
    failed = session.scalars(
        update(Job)
        .where(expired, Job.attempts >= MAX_ATTEMPTS)
        .values(
            status=JobStatus.FAILED,
            error=error,
            lease_owner=None,
            lease_expires_at=None,
            finished_at=now,
            updated_at=now,
        )
        .returning(Job.id)
    ).all()
    for job_id in failed:
        events.record(session, job_id, events.EventType.ERROR, error)
        events.record(
            session, job_id, events.EventType.STATUS, {"status": JobStatus.FAILED, "error": error}
        )
    requeued = list(
        session.scalars(
            update(Job)
            .where(expired)
            .values(
                status=JobStatus.QUEUED, lease_owner=None, lease_expires_at=None, updated_at=now
            )
            .returning(Job.id)
        ).all()
    )
    for job_id in requeued:
        events.record(
            session,
            job_id,
            events.EventType.STATUS,
            {"status": JobStatus.QUEUED, "reason": "worker_lost"},
        )
    session.commit()
    return requeued


def queued_job_ids(session: Session, *, sent_before: dt.datetime | None = None) -> list[str]:
    """Queued jobs; with ``sent_before``, only those last sent to the broker before then."""
    query = select(Job.id).where(Job.status == JobStatus.QUEUED)
    if sent_before is not None:
        query = query.where(or_(Job.enqueued_at.is_(None), Job.enqueued_at < sent_before))
    return list(session.scalars(query.order_by(Job.created_at)))


def mark_enqueued(session: Session, job_ids: Iterable[str]) -> None:
    """Record that these jobs' ids were just sent to the broker (again)."""
    ids = list(job_ids)
    for batch in id_batches(ids):
        session.execute(update(Job).where(Job.id.in_(batch)).values(enqueued_at=utcnow()))
    if ids:
        session.commit()
