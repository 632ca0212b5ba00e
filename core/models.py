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
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
# An engine build waits for a worker (or device agent) serving its target's queue, then builds.
ENGINE_STATUSES = ("waiting", "building", "succeeded", "failed")
# What a tenant uploads once and names by id in later jobs and sweeps.
RESOURCE_KINDS = ("model", "dataset")
# A webhook message is delivered, or given up after its retries.
WEBHOOK_MESSAGE_STATUSES = ("pending", "delivered", "failed")

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
        Index("ix_jobs_sweep_id", "sweep_id"),
        # Is a resource still used (DELETE answers 409 while a queued or running job uses it)?
        Index("ix_jobs_model_id", "model_id"),
        Index("ix_jobs_data_id", "data_id"),
        Index("ix_jobs_eval_data_id", "eval_data_id"),
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
    # The stored resources the job was made from (POST /v1/jobs as JSON, or a sweep); null for
    # a multipart job, which owns its inputs. Then the *_path columns name the resources' files:
    # jobs share them, nothing is copied.
    model_id: Mapped[str | None] = mapped_column(ForeignKey("resources.id", ondelete="SET NULL"))
    data_id: Mapped[str | None] = mapped_column(ForeignKey("resources.id", ondelete="SET NULL"))
    eval_data_id: Mapped[str | None] = mapped_column(
        ForeignKey("resources.id", ondelete="SET NULL")
    )
    sweep_id: Mapped[str | None] = mapped_column(ForeignKey("sweeps.id", ondelete="SET NULL"))
    # The user's own strings (``metadata`` in the API; the name is SQLAlchemy's own here).
    user_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    # Seconds spent in each finished stage, in order of entry: where the time went.
    stage_seconds: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Id of the job's newest event (core.events): each event takes the next number.
    last_event_id: Mapped[int] = mapped_column(Integer, default=0)
    # The newest training-curve point (an event of type ``metrics``).
    latest_metrics: Mapped[dict[str, Any] | None]

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
    # Stored as its sha256 (hex): what the database holds cannot be presented.
    lease_token_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]

    job: Mapped[Job] = relationship(back_populates="engines")


class JobEvent(Base):
    """One entry of a job's event log (core.events). ``id`` counts from 1 within the job, with
    no gaps: it is taken from ``jobs.last_event_id`` under the job row's lock."""

    __tablename__ = "job_events"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Resource(Base):
    """A model or dataset uploaded once (``POST /v1/models``, ``POST /v1/datasets``) and used by
    any number of jobs. The same bytes from the same tenant are one resource."""

    __tablename__ = "resources"
    __table_args__ = (
        CheckConstraint("kind IN ('model', 'dataset')", name="kind"),
        UniqueConstraint("tenant", "kind", "sha256", name="uq_resources_tenant_kind_sha256"),
        Index("ix_resources_tenant_kind_created_at_id", "tenant", "kind", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str | None] = mapped_column(String(255))  # the client's, for display only
    path: Mapped[str] = mapped_column(String(500))  # relative to data_dir
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    info: Mapped[dict[str, Any]]  # what validation found (input shape, image count, ...)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Sweep(Base):
    """One job per configuration of a grid, over the same resources; when all are final, a
    report (``report.html``, ``pareto.svg``) compares them."""

    __tablename__ = "sweeps"
    __table_args__ = (
        Index("ix_sweeps_tenant_created_at_id", "tenant", "created_at", "id"),
        UniqueConstraint("tenant", "idempotency_key", name="uq_sweeps_tenant_idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(200))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))  # core.idempotency
    model_id: Mapped[str | None] = mapped_column(ForeignKey("resources.id", ondelete="SET NULL"))
    data_id: Mapped[str | None] = mapped_column(ForeignKey("resources.id", ondelete="SET NULL"))
    eval_data_id: Mapped[str | None] = mapped_column(
        ForeignKey("resources.id", ondelete="SET NULL")
    )
    request: Mapped[dict[str, Any]]  # base_config with grid and tie, or configs, as sent
    user_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The report's files, [{name, size, sha256, created_at}], under sweeps/<id>/ once complete.
    artifacts: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[dt.datetime | None]  # all jobs final and the report stored

    jobs: Mapped[list[Job]] = relationship(order_by="Job.created_at", lazy="selectin")


class Webhook(Base):
    """A tenant's endpoint for events (Standard Webhooks): each matching event becomes a
    ``WebhookMessage``, delivered and retried by Celery tasks."""

    __tablename__ = "webhooks"
    __table_args__ = (
        Index("ix_webhooks_tenant_created_at_id", "tenant", "created_at", "id"),
        UniqueConstraint("tenant", "idempotency_key", name="uq_webhooks_tenant_idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(200))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))  # core.idempotency
    url: Mapped[str] = mapped_column(String(2000))
    events: Mapped[list[Any]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(100))  # whsec_<base64>; shown once
    # The secret before the last rotation, which also signs until its grace ends.
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_secret_expires_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WebhookMessage(Base):
    """One event for one webhook: the exact body signed and sent on every attempt."""

    __tablename__ = "webhook_messages"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="status"),
        Index("ix_webhook_messages_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # msg_<hex>: webhook-id
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(40))
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class WebhookAttempt(Base):
    """One try at delivering a message: ``GET /v1/webhooks/{id}/deliveries`` lists these."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_webhook_id_id", "webhook_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    message_id: Mapped[str] = mapped_column(ForeignKey("webhook_messages.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)  # None: no HTTP answer
    error: Mapped[str | None] = mapped_column(String(500))
    duration_ms: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
