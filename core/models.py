"""Database tables. The schema itself comes only from ``migrations/`` (Alembic), never create_all.

Timestamps are timezone-aware UTC in Python whatever the backend stores (see ``UTCDateTime``),
so SQLite and PostgreSQL compare and order them the same way.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
# An engine build waits for a worker (or device agent) serving its target's queue, then builds.
ENGINE_STATUSES = ("waiting", "building", "succeeded", "failed")

# Stable constraint names, so Alembic batch migrations on SQLite can find them again.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stores UTC; always returns aware UTC datetimes (SQLite would hand back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use core.models.utcnow()")
        return value.astimezone(dt.UTC)

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, dt.datetime: UTCDateTime}


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')", name="status"
        ),
        # Cursor pagination of one tenant's jobs, newest first.
        Index("ix_jobs_tenant_created_at_id", "tenant", "created_at", "id"),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_tenant_status", "tenant", "status"),  # per-tenant quotas
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(200))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    stage: Mapped[str | None] = mapped_column(String(32))
    config: Mapped[dict[str, Any]]
    progress: Mapped[dict[str, Any] | None]
    metrics: Mapped[dict[str, Any] | None]
    error: Mapped[dict[str, Any] | None]

    # Inputs: paths relative to data_dir, so a data directory can move as a whole.
    model_path: Mapped[str] = mapped_column(String(500))
    model_sha256: Mapped[str] = mapped_column(String(64))
    model_size: Mapped[int] = mapped_column(BigInteger)
    data_path: Mapped[str] = mapped_column(String(500))
    data_sha256: Mapped[str] = mapped_column(String(64))
    data_size: Mapped[int] = mapped_column(BigInteger)
    eval_data_path: Mapped[str | None] = mapped_column(String(500))
    eval_data_sha256: Mapped[str | None] = mapped_column(String(64))
    eval_data_size: Mapped[int | None] = mapped_column(BigInteger)

    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[dt.datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Last time the job's id was sent to the broker: the recovery sweep re-sends a queued job
    # whose message the broker no longer holds, but not one sent a moment ago.
    enqueued_at: Mapped[dt.datetime | None]
    # Set when the retention sweep (or a deletion) removed the uploaded inputs of a finished job.
    inputs_deleted_at: Mapped[dt.datetime | None]

    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]

    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="job",
        order_by="Artifact.id",
        cascade="all, delete-orphan",
        passive_deletes=True,
        lazy="selectin",
    )
    engines: Mapped[list[EngineBuild]] = relationship(
        back_populates="job",
        order_by="EngineBuild.target",
        cascade="all, delete-orphan",
        passive_deletes=True,
        lazy="selectin",
    )


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_id_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(String(500))  # relative to data_dir
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="artifacts")


class EngineBuild(Base):
    """One TensorRT engine of a succeeded job, for one target; built on that target.

    Celery engine workers (queue ``engine.<target>``) and device agents (REST) claim the same
    rows, with a lease as training jobs have: whoever claims first builds it.
    """

    __tablename__ = "engine_builds"
    __table_args__ = (
        CheckConstraint("status IN ('waiting', 'building', 'succeeded', 'failed')", name="status"),
        UniqueConstraint("job_id", "target", name="uq_engine_builds_job_id_target"),
        Index("ix_engine_builds_target_status", "target", "status"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    target: Mapped[str] = mapped_column(String(63))
    status: Mapped[str] = mapped_column(String(16), default="waiting")
    builder: Mapped[str | None] = mapped_column(String(200))  # who claimed it: worker or agent
    report: Mapped[dict[str, Any] | None]  # engine-<target>.json: provenance and timings
    error: Mapped[dict[str, Any] | None]
    lease_expires_at: Mapped[dt.datetime | None]
    # A secret handed to the builder with its claim: results, failures and lease renewals must
    # present it, so no other key of the tenant can complete (or spoof) a build it does not hold.
    lease_token: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]

    job: Mapped[Job] = relationship(back_populates="engines")
