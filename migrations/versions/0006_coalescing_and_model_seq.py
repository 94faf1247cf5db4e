"""jobs.served_by_job_id (coalesced jobs) and models.job_seq (per-model submission counter)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("served_by_job_id", sa.String(36), nullable=True))
        batch.create_foreign_key("fk_jobs_served_by", "jobs", ["served_by_job_id"], ["id"])
        batch.create_index("ix_jobs_served_by", ["served_by_job_id"])
    op.add_column(
        "models", sa.Column("job_seq", sa.BigInteger(), nullable=False, server_default="0")
    )
    # Continue each model's line after its highest submission so far.
    op.execute(
        "UPDATE models SET job_seq = COALESCE("
        "(SELECT MAX(jobs.submitted_seq) FROM jobs WHERE jobs.model_id = models.id), 0)"
    )
    op.create_index("ix_jobs_created", "jobs", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_created", table_name="jobs")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("job_seq")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_served_by")
        batch.drop_constraint("fk_jobs_served_by", type_="foreignkey")
        batch.drop_column("served_by_job_id")
