"""hashed lease tokens: an engine build keeps the sha256 of its claim's lease token, not the
token, so that the database alone cannot complete or spoof a build

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BUILDS = sa.table(
    "engine_builds",
    sa.column("id", sa.String),
    sa.column("lease_token", sa.String),
    sa.column("lease_token_sha256", sa.String),
)


def upgrade() -> None:
    with op.batch_alter_table("engine_builds") as batch:
        batch.add_column(sa.Column("lease_token_sha256", sa.String(64), nullable=True))
    # Builds held now keep their claim: the builder's token still matches.
    connection = op.get_bind()
    held = connection.execute(
        sa.select(BUILDS.c.id, BUILDS.c.lease_token).where(BUILDS.c.lease_token.is_not(None))
    ).all()
    for build_id, token in held:
        digest = hashlib.sha256(token.encode()).hexdigest()
        connection.execute(
            BUILDS.update().where(BUILDS.c.id == build_id).values(lease_token_sha256=digest)
        )
    with op.batch_alter_table("engine_builds") as batch:
        batch.drop_column("lease_token")


def downgrade() -> None:
    # A token cannot be recovered from its hash: builds held now lose their claim (their lease
    # expires and another builder takes them).
    with op.batch_alter_table("engine_builds") as batch:
        batch.add_column(sa.Column("lease_token", sa.String(64), nullable=True))
        batch.drop_column("lease_token_sha256")
