"""workflows: resources uploaded once, sweeps, job event logs, webhooks; jobs record their
resources, sweep, metadata, stage durations and newest curve point

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AWARE = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "resources",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("tenant", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("filename", sa.String(255), nullable=True),
        sa.Column("path", sa.String(500), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("info", sa.JSON(), nullable=False),
        sa.Column("created_at", AWARE, nullable=False),
        sa.CheckConstraint("kind IN ('model', 'dataset')", name=op.f("ck_resources_kind")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_resources")),
        sa.UniqueConstraint("tenant", "kind", "sha256", name="uq_resources_tenant_kind_sha256"),
    )
    op.create_index(
        "ix_resources_tenant_kind_created_at_id",
        "resources",
        ["tenant", "kind", "created_at", "id"],
    )
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("tenant", sa.String(200), nullable=False),
        sa.Column("model_id", sa.String(36), nullable=True),
        sa.Column("data_id", sa.String(36), nullable=True),
        sa.Column("eval_data_id", sa.String(36), nullable=True),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("artifacts", sa.JSON(), nullable=False),
        sa.Column("created_at", AWARE, nullable=False),
        sa.Column("completed_at", AWARE, nullable=True),
        *(
            sa.ForeignKeyConstraint(
                [column],
                ["resources.id"],
                name=op.f(f"fk_sweeps_{column}_resources"),
                ondelete="SET NULL",
            )
            for column in ("model_id", "data_id", "eval_data_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
    )
    op.create_index("ix_sweeps_tenant_created_at_id", "sweeps", ["tenant", "created_at", "id"])

    with op.batch_alter_table("jobs") as batch:
        for column in ("model_id", "data_id", "eval_data_id"):
            batch.add_column(sa.Column(column, sa.String(36), nullable=True))
            batch.create_foreign_key(
                f"fk_jobs_{column}_resources", "resources", [column], ["id"], ondelete="SET NULL"
            )
        batch.add_column(sa.Column("sweep_id", sa.String(36), nullable=True))
        batch.create_foreign_key(
            "fk_jobs_sweep_id_sweeps", "sweeps", ["sweep_id"], ["id"], ondelete="SET NULL"
        )
        batch.add_column(sa.Column("metadata", sa.JSON(), nullable=False, server_default="{}"))
        batch.add_column(
            sa.Column("stage_seconds", sa.JSON(), nullable=False, server_default="{}")
        )
        batch.add_column(
            sa.Column("last_event_id", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("latest_metrics", sa.JSON(), nullable=True))
    for column in ("sweep_id", "model_id", "data_id", "eval_data_id"):
        op.create_index(f"ix_jobs_{column}", "jobs", [column])

    op.create_table(
        "job_events",
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", AWARE, nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_events_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "id", name=op.f("pk_job_events")),
    )

    op.create_table(
        "webhooks",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("tenant", sa.String(200), nullable=False),
        sa.Column("url", sa.String(2000), nullable=False),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("secret", sa.String(100), nullable=False),
        sa.Column("created_at", AWARE, nullable=False),
        sa.Column("updated_at", AWARE, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhooks")),
    )
    op.create_index(
        "ix_webhooks_tenant_created_at_id", "webhooks", ["tenant", "created_at", "id"]
    )
    op.create_table(
        "webhook_messages",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("webhook_id", sa.String(36), nullable=False),
        sa.Column("type", sa.String(40), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", AWARE, nullable=True),
        sa.Column("created_at", AWARE, nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'failed')",
            name=op.f("ck_webhook_messages_status"),
        ),
        sa.ForeignKeyConstraint(
            ["webhook_id"],
            ["webhooks.id"],
            name=op.f("fk_webhook_messages_webhook_id_webhooks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_messages")),
    )
    op.create_index(
        "ix_webhook_messages_status_next_attempt_at",
        "webhook_messages",
        ["status", "next_attempt_at"],
    )
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("webhook_id", sa.String(36), nullable=False),
        sa.Column("message_id", sa.String(40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(500), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("created_at", AWARE, nullable=False),
        sa.ForeignKeyConstraint(
            ["webhook_id"],
            ["webhooks.id"],
            name=op.f("fk_webhook_attempts_webhook_id_webhooks"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["webhook_messages.id"],
            name=op.f("fk_webhook_attempts_message_id_webhook_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_attempts")),
    )
    op.create_index(
        "ix_webhook_attempts_webhook_id_id", "webhook_attempts", ["webhook_id", "id"]
    )


def downgrade() -> None:
    op.drop_table("webhook_attempts")
    op.drop_table("webhook_messages")
    op.drop_table("webhooks")
    op.drop_table("job_events")
    for column in ("sweep_id", "model_id", "data_id", "eval_data_id"):
        op.drop_index(f"ix_jobs_{column}", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for column in ("latest_metrics", "last_event_id", "stage_seconds", "metadata"):
            batch.drop_column(column)
        batch.drop_constraint("fk_jobs_sweep_id_sweeps", type_="foreignkey")
        batch.drop_column("sweep_id")
        for column in ("eval_data_id", "data_id", "model_id"):
            batch.drop_constraint(f"fk_jobs_{column}_resources", type_="foreignkey")
            batch.drop_column(column)
    op.drop_table("sweeps")
    op.drop_table("resources")
