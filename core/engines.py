"""TensorRT engine builds: one row per succeeded job and target, built on that target.

Lifecycle. A job that succeeds with ``export.tensorrt_targets`` gets one ``waiting`` build per
target, announced on the Celery queue ``engine.<target>``. Whoever serves that target claims it
(``building``, under a lease): an engine worker consuming the queue, or a device agent asking
over REST (``POST /v1/engine-builds/claim``, for devices that cannot run our stack or sit
behind NAT). The builder reports ``succeeded``, with ``engine-<target>.plan`` and
``engine-<target>.json`` stored as the job's artifacts, or ``failed``. A build whose lease
expires (its builder died) is claimable again. Until a builder claims it a build stays
``waiting``, which ``GET /v1/jobs/{id}`` shows with its queue: nothing is written for it.
"""

from __future__ import annotations

import datetime as dt
import uuid
from enum import StrEnum
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from core.config import JobConfig
from core.errors import InputError
from core.models import EngineBuild, Job, utcnow

ENGINE_LEASE_SECONDS = 1800  # a build takes minutes; a builder silent this long has died
PLAN_SUFFIX = ".plan"


class EngineStatus(StrEnum):
    WAITING = "waiting"
    BUILDING = "building"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class EngineBuildNotFound(InputError):
    status_code = 404

    def __init__(self, build_id: str) -> None:
        super().__init__("engine_build_not_found", f"no engine build {build_id}")


class EngineBuildNotClaimed(InputError):
    status_code = 409

    def __init__(self, build_id: str) -> None:
        super().__init__(
            "engine_build_not_claimed",
            f"engine build {build_id} is not being built by this builder (finished, or its "
            "lease expired and another builder took it)",
        )


def engine_queue(target: str) -> str:
    """The Celery queue of a target's builds, which only workers on that device consume."""
    return f"engine.{target}"


def artifact_names(target: str) -> tuple[str, str]:
    """The engine and its provenance report, as the job's artifacts."""
    return f"engine-{target}{PLAN_SUFFIX}", f"engine-{target}.json"


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
    session.commit()
    return builds


def _claimable(now: dt.datetime) -> Any:
    return or_(
        EngineBuild.status == EngineStatus.WAITING,
        and_(EngineBuild.status == EngineStatus.BUILDING, EngineBuild.lease_expires_at < now),
    )


def claim_build(
    session: Session, build_id: str, builder: str, *, now: dt.datetime | None = None
) -> EngineBuild | None:
    """Take a waiting build (or one whose builder's lease expired); None if another has it."""
    now = now or utcnow()
    claimed = session.execute(
        update(EngineBuild)
        .where(EngineBuild.id == build_id, _claimable(now))
        .values(
            status=EngineStatus.BUILDING,
            builder=builder,
            lease_expires_at=now + dt.timedelta(seconds=ENGINE_LEASE_SECONDS),
            started_at=now,
            updated_at=now,
            error=None,
        )
    )
    session.commit()
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return session.get(EngineBuild, build_id, populate_existing=True)


def claim_next(session: Session, tenant: str, target: str, builder: str) -> EngineBuild | None:
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
        build = claim_build(session, build_id, builder, now=now)
        if build is not None:
            return build
    return None


def get_build(session: Session, tenant: str, build_id: str) -> EngineBuild:
    """A build of one of ``tenant``'s jobs; another tenant's is as absent as a missing one."""
    build = session.get(EngineBuild, build_id)
    if build is None or build.job.tenant != tenant:
        raise EngineBuildNotFound(build_id)
    return build


def finish_build(
    session: Session,
    build_id: str,
    builder: str,
    *,
    report: dict[str, Any] | None = None,
    error: tuple[str, str] | None = None,
) -> EngineBuild:
    """Mark the build ``builder`` holds succeeded (with its report) or failed (code, message)."""
    now = utcnow()
    status = EngineStatus.FAILED if error is not None else EngineStatus.SUCCEEDED
    finished = session.execute(
        update(EngineBuild)
        .where(
            EngineBuild.id == build_id,
            EngineBuild.builder == builder,
            EngineBuild.status == EngineStatus.BUILDING,
        )
        .values(
            status=status,
            report=report,
            error={"code": error[0], "message": error[1]} if error else None,
            lease_expires_at=None,
            finished_at=now,
            updated_at=now,
        )
    )
    session.commit()
    if finished.rowcount != 1:  # type: ignore[attr-defined]
        raise EngineBuildNotClaimed(build_id)
    build = session.get(EngineBuild, build_id, populate_existing=True)
    assert build is not None
    return build
