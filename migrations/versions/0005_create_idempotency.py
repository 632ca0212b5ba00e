"""create idempotency: sweeps and webhooks remember the Idempotency-Key they were made with,
unique per tenant, as jobs do

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("sweeps", "webhooks")


def upgrade() -> None:
    # Batch mode: SQLite adds a constraint only by rebuilding the table.
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("idempotency_key", sa.String(200), nullable=True))
            batch.create_unique_constraint(
                f"uq_{table}_tenant_idempotency_key", ["tenant", "idempotency_key"]
            )


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"uq_{table}_tenant_idempotency_key", type_="unique")
            batch.drop_column("idempotency_key")
