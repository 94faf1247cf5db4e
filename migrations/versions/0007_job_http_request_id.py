"""jobs.http_request_id: the X-Request-ID of the API request that created the job

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: jobs created before this revision (and outside HTTP) have none.
    op.add_column("jobs", sa.Column("http_request_id", sa.String(128), nullable=True))


def downgrade() -> None:
    # batch mode: SQLite cannot drop a column in place on every version.
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("http_request_id")
