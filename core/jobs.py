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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import events
from core.config import JobConfig
from core.errors import InputError, QuotaExceeded, TooLargeError
from core.json_values import json_safe
from core.models import Artifact, Job, utcnow
from core.pages import Page, newest_first
from core.settings import Settings
from core.storage import Storage, StoredFile, human_bytes

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


class JobNotFound(InputError):
    status_code = 404

    def __init__(self, job_id: str) -> None:
        super().__init__("job_not_found", f"no job {job_id!r}")


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
    if not isinstance(raw, dict):
        raise InputError("invalid_config", "config must be a JSON object")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise InputError("invalid_config", describe_validation_error(exc, "config")) from exc


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
    storage = Storage(settings.data_dir)
    adopted: Path | None = None
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
        adopted = storage.adopt_upload(upload.directory, job_id)

        def stored(file: StoredFile) -> str:
            return storage.relative(adopted / file.path.name)

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
            cancel_requested=False,
            attempts=0,
            enqueued_at=utcnow(),
        )
        if upload.eval_data is not None:
            job.eval_data_path = stored(upload.eval_data)
            job.eval_data_sha256 = upload.eval_data.sha256
            job.eval_data_size = upload.eval_data.size
        try:
            add_job(session, job)
            session.commit()
        except IntegrityError:
            # A concurrent request with the same idempotency key won the race.
            session.rollback()
            existing = (
                find_by_idempotency_key(session, tenant, idempotency_key)
                if idempotency_key is not None
                else None
            )
            if existing is None:
                raise
            return existing, False
        committed = True
        return job, True
    finally:
        # Whatever a committed job did not adopt is garbage now.
        storage.remove_tree(upload.directory)
        if adopted is not None and not committed:
            storage.remove_tree(adopted.parent)


def add_job(session: Session, job: Job) -> None:
    """Add a new queued job to the session with its first event; the caller commits.

    Every way of making a job (multipart, JSON, a sweep) goes through here, so that every
    job's event log starts with ``queued``.
    """
    session.add(job)
    session.flush()  # the row must exist for its event to be numbered
    events.record(session, job.id, events.EventType.STATUS, {"status": JobStatus.QUEUED})


def find_by_idempotency_key(session: Session, tenant: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key))


ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
QUOTA_RETRY_AFTER_S = 60


def stored_bytes(session: Session, tenant: str) -> int:
    """Bytes the tenant keeps on disk: inputs not yet deleted, and artifacts."""
    live_inputs = Job.tenant == tenant, Job.inputs_deleted_at.is_(None)
    inputs = session.scalar(
        select(
            func.coalesce(
                func.sum(Job.model_size + Job.data_size + func.coalesce(Job.eval_data_size, 0)), 0
            )
        ).where(*live_inputs)
    )
    artifacts = session.scalar(
        select(func.coalesce(func.sum(Artifact.size), 0)).join(Job).where(Job.tenant == tenant)
    )
    return int(inputs or 0) + int(artifacts or 0)


def check_quota(session: Session, settings: Settings, tenant: str, *, incoming_bytes: int) -> None:
    """Refuse a new job beyond the tenant's quotas: 429 (active jobs) or 413 (stored bytes).

    Checked before the body is read (``incoming_bytes`` from Content-Length) and again with the
    real sizes. Two uploads racing can both pass; the next one is refused.
    """
    active = session.scalar(
        select(func.count()).where(Job.tenant == tenant, Job.status.in_(ACTIVE))
    )
    if (active or 0) >= settings.max_active_jobs_per_tenant:
        raise QuotaExceeded(
            "too_many_active_jobs",
            f"{active} jobs are queued or running, the limit of this API key's tenant is "
            f"{settings.max_active_jobs_per_tenant}; retry when one has finished",
            headers={"Retry-After": str(QUOTA_RETRY_AFTER_S)},
        )
    used = stored_bytes(session, tenant)
    if used + incoming_bytes > settings.max_stored_bytes_per_tenant:
        raise TooLargeError(
            "storage_quota_exceeded",
            f"this tenant stores {human_bytes(used)}; {human_bytes(incoming_bytes)} more would "
            f"pass its quota of {human_bytes(settings.max_stored_bytes_per_tenant)}: "
            "delete finished jobs (DELETE /v1/jobs/{id})",
        )


def discard_unqueued(session: Session, settings: Settings, job_id: str) -> None:
    """Delete a job the broker refused, row and files: the client is told to retry (503), and
    its retry, with or without the same Idempotency-Key, submits anew."""
    session.execute(delete(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED))
    session.commit()
    Storage(settings.data_dir).remove_job_files(job_id)


# ---------------------------------------------------------------------------------------------
# Reading


def get_job(session: Session, tenant: str, job_id: str) -> Job:
    """The tenant's job; another tenant's job is as unknown as a missing one."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant == tenant))
    if job is None:
        raise JobNotFound(job_id)
    return job


def list_jobs(
    session: Session, tenant: str, *, limit: int = 20, cursor: str | None = None
) -> Page[Job]:
    """The tenant's jobs, newest first, ``limit`` at a time (see ``core.pages``)."""
    query = select(Job).where(Job.tenant == tenant)
    return newest_first(session, query, Job, limit=limit, cursor=cursor)


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
    if canceled.rowcount == 0:  # type: ignore[attr-defined]
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
    Storage(settings.data_dir).remove_job_files(job_id)


def is_cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


# ---------------------------------------------------------------------------------------------
# Leases (worker side). Every write names the owner: a worker that lost its lease changes nothing.


def _lease_until(lease_seconds: int, now: dt.datetime | None = None) -> dt.datetime:
    return (now or utcnow()) + dt.timedelta(seconds=lease_seconds)


def claim_job(
    session: Session, job_id: str, owner: str, lease_seconds: int, *, now: dt.datetime | None = None
) -> Job | None:
    """Take the lease of a queued job, or of a running one whose lease expired; None otherwise."""
    now = now or utcnow()
    claimed = session.execute(
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
    )
    session.commit()
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return session.get(Job, job_id, populate_existing=True)


def _owned_update(
    session: Session,
    job_id: str,
    owner: str,
    values: dict[str, Any],
    *,
    now: dt.datetime,
    commit: bool = True,
) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING)
        .values(updated_at=now, **values)
    )
    if commit:
        session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def renew_lease(session: Session, job_id: str, owner: str, lease_seconds: int) -> bool:
    """Heartbeat; False when the lease was lost (expired and taken, or the job finished)."""
    now = utcnow()
    return _owned_update(
        session, job_id, owner, {"lease_expires_at": _lease_until(lease_seconds, now)}, now=now
    )


def report_stage(session: Session, job_id: str, owner: str, stage: str, lease_seconds: int) -> bool:
    now = utcnow()
    values = {"stage": stage, "lease_expires_at": _lease_until(lease_seconds, now)}
    return _owned_update(session, job_id, owner, values, now=now)


def report_progress(
    session: Session, job_id: str, owner: str, progress: dict[str, Any], lease_seconds: int
) -> bool:
    now = utcnow()
    values = {"progress": json_safe(progress), "lease_expires_at": _lease_until(lease_seconds, now)}
    return _owned_update(session, job_id, owner, values, now=now)


def report_metrics(session: Session, job_id: str, owner: str, point: dict[str, Any]) -> bool:
    """A training-curve point: an event of type ``metrics``, and the job's ``latest_metrics``."""
    point = json_safe(point)
    if not _owned_update(
        session, job_id, owner, {"latest_metrics": point}, now=utcnow(), commit=False
    ):
        session.rollback()
        return False
    events.record(session, job_id, events.EventType.METRICS, point)
    session.commit()
    return True


def report_warning(session: Session, job_id: str, code: str, message: str) -> None:
    events.record(session, job_id, events.EventType.WARNING, {"code": code, "message": message})
    session.commit()


def record_artifact(session: Session, settings: Settings, job_id: str, stored: StoredFile) -> None:
    """Record (or, on a rerun, replace) one stored artifact of a job."""
    name = stored.path.name
    session.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    session.add(
        Artifact(
            job_id=job_id,
            name=name,
            path=Storage(settings.data_dir).relative(stored.path),
            size=stored.size,
            sha256=stored.sha256,
        )
    )
    session.commit()


def _finish(
    session: Session, job_id: str, owner: str, status: JobStatus, values: dict[str, Any]
) -> bool:
    now = utcnow()
    finished = _owned_update(
        session,
        job_id,
        owner,
        {"status": status, "finished_at": now, "lease_owner": None, "lease_expires_at": None}
        | values,
        now=now,
    )
    if not finished:
        log.warning("job %s: lease of %s lost before it could be marked %s", job_id, owner, status)
    return finished


def succeed(session: Session, job_id: str, owner: str, metrics: dict[str, Any]) -> bool:
    return _finish(
        session, job_id, owner, JobStatus.SUCCEEDED, {"metrics": json_safe(metrics), "stage": None}
    )


def fail(session: Session, job_id: str, owner: str, code: str, message: str) -> bool:
    error = {"code": code, "message": message}
    return _finish(session, job_id, owner, JobStatus.FAILED, {"error": error})


def cancel(session: Session, job_id: str, owner: str) -> bool:
    """The worker stopped a job whose cancel was requested."""
    return _finish(session, job_id, owner, JobStatus.CANCELED, {})


# ---------------------------------------------------------------------------------------------
# Recovery


def requeue_expired(session: Session, *, now: dt.datetime | None = None) -> list[str]:
    """Put running jobs whose lease expired (their worker died) back in the queue.

    Returns their ids, to be enqueued again; a job that used up ``MAX_ATTEMPTS`` fails instead.
    Clearing the owner makes a worker that was only stalled, not dead, lose the job.
    """
    now = now or utcnow()
    expired = and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
    session.execute(
        update(Job)
        .where(expired, Job.attempts >= MAX_ATTEMPTS)
        .values(
            status=JobStatus.FAILED,
            error={
                "code": "worker_lost",
                "message": f"the worker running this job stopped {MAX_ATTEMPTS} times",
            },
            lease_owner=None,
            lease_expires_at=None,
            finished_at=now,
            updated_at=now,
        )
    )
    ids = list(session.scalars(select(Job.id).where(expired)))
    if ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(ids), expired)
            .values(
                status=JobStatus.QUEUED, lease_owner=None, lease_expires_at=None, updated_at=now
            )
        )
    session.commit()
    return ids


def queued_job_ids(session: Session, *, sent_before: dt.datetime | None = None) -> list[str]:
    """Queued jobs; with ``sent_before``, only those last sent to the broker before then."""
    query = select(Job.id).where(Job.status == JobStatus.QUEUED)
    if sent_before is not None:
        query = query.where(or_(Job.enqueued_at.is_(None), Job.enqueued_at < sent_before))
    return list(session.scalars(query.order_by(Job.created_at)))


def mark_enqueued(session: Session, job_ids: Iterable[str]) -> None:
    """Record that these jobs' ids were just sent to the broker (again)."""
    ids = list(job_ids)
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(enqueued_at=utcnow()))
        session.commit()
