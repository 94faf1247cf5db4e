"""jobs.kind renamed jobs.method: the column holds the request's forgetting method

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-12 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _rename(old: str, new: str) -> None:
    # batch mode for SQLite; recreate="never" makes it a native RENAME COLUMN (SQLite 3.25+)
    # rather than a copy of the table, which would drop the triggers SQLite keeps on it.
    with op.batch_alter_table("jobs", recreate="never") as batch:
        batch.alter_column(
            old, new_column_name=new, existing_type=sa.String(16), existing_nullable=False
        )


def upgrade() -> None:
    _rename("kind", "method")


def downgrade() -> None:
    _rename("method", "kind")
