"""TensorRT engine builds: one row per succeeded job and target, built on that target.

Lifecycle. A job that succeeds with ``export.tensorrt_targets`` gets one ``waiting`` build per
target, announced on the Celery queue ``engine.<target>``. Whoever serves that target claims it
(``building``, under a lease): an engine worker consuming the queue, or a device agent asking
over REST (``POST /v1/engine-builds/claim``, for devices that cannot run our stack or sit
behind NAT). A claim hands the builder a secret lease token; renewing the lease and reporting
the result need the builder's name and that token, so no other builder (nor another key of the
tenant) can complete, or spoof the provenance of, a build it does not hold. The builder renews
its lease while it builds and reports ``succeeded``, with ``engine-<target>.plan`` and
``engine-<target>.json`` stored as the job's artifacts, or ``failed``. A build whose lease
expires (its builder died) is claimable again, under a new token. Until a builder claims it a
build stays ``waiting``, which ``GET /v1/jobs/{id}`` shows with its queue: nothing is written
for it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import secrets
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from core import events
from core.config import JobConfig
from core.errors import InputError, NotFound
from core.jobs import record_artifact
from core.models import Artifact, EngineBuild, Job, utcnow
from core.settings import Settings
from core.storage import open_storage

ENGINE_LEASE_SECONDS = 1800  # a build takes minutes; a builder silent this long has died
LEASE_TOKEN_BYTES = 32  # secrets.token_urlsafe(32): 43 characters, within the column's 64
PLAN_SUFFIX = ".plan"


class EngineStatus(StrEnum):
    WAITING = "waiting"
    BUILDING = "building"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class EngineBuildNotClaimed(InputError):
    status_code = 409

    def __init__(self, build_id: str) -> None:
        super().__init__(
            "engine_build_not_claimed",
            f"engine build {build_id} is not being built under this lease token (a wrong or "
            "missing X-Lease-Token, the build finished, or its lease expired and another "
            "builder took it)",
        )


def engine_queue(target: str) -> str:
    """The Celery queue of a target's builds, which only workers on that device consume."""
    return f"engine.{target}"


SOURCE_ARTIFACT = "model_qdq.onnx"
"""The artifact engines are built from."""


def source_artifact(session: Session, job_id: str) -> Artifact | None:
    """The job's ``model_qdq.onnx`` (key and sha256), if it wrote one."""
    return session.scalar(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.name == SOURCE_ARTIFACT)
    )


def artifact_names(target: str) -> tuple[str, str]:
    """The engine and its provenance report, as the job's artifacts."""
    return f"engine-{target}{PLAN_SUFFIX}", f"engine-{target}.json"


def _record_change(
    session: Session,
    job_id: str,
    build_id: str,
    target: str,
    status: EngineStatus,
    error: dict[str, str] | None = None,
) -> None:
    """An ``engine`` event in the job's log, in the caller's transaction."""
    data: dict[str, Any] = {"build_id": build_id, "target": target, "status": status}
    if error is not None:
        data["error"] = error
    events.record(session, job_id, events.EventType.ENGINE, data)


def create_builds(session: Session, job: Job) -> list[EngineBuild]:
    """A ``waiting`` build for each target the job's config asks for (none twice)."""
    targets = JobConfig.model_validate(job.config).export.tensorrt_targets
    existing = {build.target for build in job.engines}
    builds = [
        EngineBuild(id=str(uuid.uuid4()), job_id=job.id, target=target, status="waiting")
        for target in targets
        if target not in existing
    ]
    session.add_all(builds)
    for build in builds:
        _record_change(session, job.id, build.id, build.target, EngineStatus.WAITING)
    session.commit()
    return builds


def _claimable(now: dt.datetime) -> Any:
    return or_(
        EngineBuild.status == EngineStatus.WAITING,
        and_(EngineBuild.status == EngineStatus.BUILDING, EngineBuild.lease_expires_at < now),
    )


@dataclass(frozen=True)
class Claim:
    """A claimed build and its lease token, which only this claimant learns (the row keeps its
    sha256)."""

    build: EngineBuild
    lease_token: str


def token_sha256(lease_token: str) -> str:
    return hashlib.sha256(lease_token.encode()).hexdigest()


def claim_build(
    session: Session, build_id: str, builder: str, *, now: dt.datetime | None = None
) -> Claim | None:
    """Take a waiting build (or one whose builder's lease expired); None if another has it."""
    now = now or utcnow()
    lease_token = secrets.token_urlsafe(LEASE_TOKEN_BYTES)
    claimed = session.execute(
        update(EngineBuild)
        .where(EngineBuild.id == build_id, _claimable(now))
        .values(
            status=EngineStatus.BUILDING,
            builder=builder,
            lease_token_sha256=token_sha256(lease_token),
            lease_expires_at=now + dt.timedelta(seconds=ENGINE_LEASE_SECONDS),
            started_at=now,
            updated_at=now,
            error=None,
        )
        .returning(EngineBuild.job_id, EngineBuild.target)
    ).one_or_none()
    if claimed is None:
        session.rollback()
        return None
    _record_change(session, claimed.job_id, build_id, claimed.target, EngineStatus.BUILDING)
    session.commit()
    build = session.get(EngineBuild, build_id, populate_existing=True)
    assert build is not None
    return Claim(build, lease_token)


def claim_next(session: Session, tenant: str, target: str, builder: str) -> Claim | None:
    """The oldest claimable build of ``target`` among ``tenant``'s jobs, claimed; None if none.

    Two builders racing for one row: the loser's ``claim_build`` finds it taken and tries the
    next one.
    """
    now = utcnow()
    candidates = session.scalars(
        select(EngineBuild.id)
        .join(Job)
        .where(Job.tenant == tenant, EngineBuild.target == target, _claimable(now))
        .order_by(EngineBuild.created_at, EngineBuild.id)
        .limit(10)
    ).all()
    for build_id in candidates:
        claim = claim_build(session, build_id, builder, now=now)
        if claim is not None:
            return claim
    return None


def get_build(session: Session, tenant: str, build_id: str) -> EngineBuild:
    """A build of one of ``tenant``'s jobs; another tenant's is as absent as a missing one."""
    build = session.get(EngineBuild, build_id)
    if build is None or build.job.tenant != tenant:
        raise NotFound("engine build", build_id)
    return build


def held_build(
    session: Session, tenant: str, build_id: str, lease_token: str | None
) -> EngineBuild:
    """``tenant``'s build ``build_id``, if ``lease_token`` is its current claim's (404 if there is
    no such build, 409 if the token is missing, wrong, or its claim is over)."""
    build = get_build(session, tenant, build_id)
    held = (
        build.status == EngineStatus.BUILDING
        and build.lease_token_sha256 is not None
        and lease_token is not None
        and hmac.compare_digest(build.lease_token_sha256, token_sha256(lease_token))
    )
    if not held:
        raise EngineBuildNotClaimed(build_id)
    return build


def _held_by(build_id: str, builder: str, lease_token: str) -> Any:
    """The WHERE clause of every write of a builder: its name, its token, still building."""
    return and_(
        EngineBuild.id == build_id,
        EngineBuild.builder == builder,
        EngineBuild.lease_token_sha256 == token_sha256(lease_token),
        EngineBuild.status == EngineStatus.BUILDING,
    )


def renew_build_lease(
    session: Session,
    build_id: str,
    builder: str,
    lease_token: str,
    *,
    now: dt.datetime | None = None,
) -> dt.datetime | None:
    """Extend the lease of the build ``builder`` holds under ``lease_token``; the new expiry, or
    None if the claim is over (finished, or taken by another builder after it expired)."""
    now = now or utcnow()
    expires_at = now + dt.timedelta(seconds=ENGINE_LEASE_SECONDS)
    renewed = session.execute(
        update(EngineBuild)
        .where(_held_by(build_id, builder, lease_token))
        .values(lease_expires_at=expires_at, updated_at=now)
    )
    session.commit()
    return expires_at if renewed.rowcount == 1 else None  # type: ignore[attr-defined]


def finish_build(
    session: Session,
    build_id: str,
    builder: str,
    lease_token: str,
    *,
    report: dict[str, Any] | None = None,
    error: tuple[str, str] | None = None,
) -> EngineBuild:
    """Mark the build ``builder`` holds under ``lease_token`` succeeded (with its report) or
    failed (code, message); the token dies with the claim."""
    now = utcnow()
    status = EngineStatus.FAILED if error is not None else EngineStatus.SUCCEEDED
    error_body = {"code": error[0], "message": error[1]} if error else None
    finished = session.execute(
        update(EngineBuild)
        .where(_held_by(build_id, builder, lease_token))
        .values(
            status=status,
            report=report,
            error=error_body,
            lease_expires_at=None,
            lease_token_sha256=None,
            finished_at=now,
            updated_at=now,
        )
        .returning(EngineBuild.job_id, EngineBuild.target)
    ).one_or_none()
    if finished is None:
        session.rollback()
        raise EngineBuildNotClaimed(build_id)
    _record_change(session, finished.job_id, build_id, finished.target, status, error_body)
    session.commit()
    build = session.get(EngineBuild, build_id, populate_existing=True)
    assert build is not None
    return build


def store_result(
    session: Session,
    settings: Settings,
    build: EngineBuild,
    builder: str,
    lease_token: str,
    plan: Path,
    report: dict[str, Any],
) -> EngineBuild:
    """Store ``plan`` and ``report`` as the job's ``engine-<target>.*`` artifacts and mark the
    build succeeded, if ``builder`` still holds it under ``lease_token`` (else 409, nothing
    stored).

    ``plan`` lies in a folder of this attempt alone (a request's staging folder, a worker's
    temporary one), where the report is written next to it; the caller deletes the folder.
    """
    # Checked again just before anything is stored (an upload or a build can outlast a lease),
    # and renewed, so that no other builder can take the build before it is finished below.
    if renew_build_lease(session, build.id, builder, lease_token) is None:
        raise EngineBuildNotClaimed(build.id)
    plan_name, report_name = artifact_names(build.target)
    report_path = plan.with_name(report_name)
    report_path.write_text(json.dumps(report, indent=2))
    storage = open_storage(settings)
    for name, path in ((plan_name, plan), (report_name, report_path)):
        record_artifact(session, build.job_id, storage.store_artifact(build.job_id, name, path))
    return finish_build(session, build.id, builder, lease_token, report=report)
