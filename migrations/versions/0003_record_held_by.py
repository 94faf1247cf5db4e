"""records.held_by_request_id: the last deletion request that named the record

Submissions check it instead of expanding the key list of every queued request, so their
cost no longer grows with the backlog. Filled here from the requests that hold records now.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 14:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HOLDING = ("queued", "running", "needs_review")  # frozen here: migrations never import the app


def upgrade() -> None:
    op.add_column("records", sa.Column("held_by_request_id", sa.String(36), nullable=True))
    requests = sa.table(
        "deletion_requests",
        sa.column("id", sa.String),
        sa.column("dataset_id", sa.String),
        sa.column("record_keys", sa.JSON),
        sa.column("status", sa.String),
        sa.column("created_at", sa.DateTime),
    )
    records = sa.table(
        "records",
        sa.column("dataset_id", sa.String),
        sa.column("key", sa.String),
        sa.column("held_by_request_id", sa.String),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(requests.c.id, requests.c.dataset_id, requests.c.record_keys)
        .where(requests.c.status.in_(HOLDING))
        .order_by(requests.c.created_at)
    )
    for request_id, dataset_id, keys in rows.all():
        keys = list(keys or [])
        for start in range(0, len(keys), 500):
            conn.execute(
                records.update()
                .where(
                    records.c.dataset_id == dataset_id,
                    records.c.key.in_(keys[start : start + 500]),
                )
                .values(held_by_request_id=request_id)
            )


def downgrade() -> None:
    with op.batch_alter_table("records") as batch:
        batch.drop_column("held_by_request_id")
