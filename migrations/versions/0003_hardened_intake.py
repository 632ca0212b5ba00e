"""hardened intake: when a job was last sent to the broker, when its inputs were deleted, and
the lease token that binds an engine result to its claim

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("inputs_deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_jobs_tenant_status", "jobs", ["tenant", "status"], unique=False)
    with op.batch_alter_table("engine_builds") as batch:
        batch.add_column(sa.Column("lease_token", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("engine_builds") as batch:
        batch.drop_column("lease_token")
    op.drop_index("ix_jobs_tenant_status", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("inputs_deleted_at")
        batch.drop_column("enqueued_at")
