"""SQLite: the jobs status triggers again (0006 rebuilt the jobs table in batch mode, and a
rebuilt SQLite table loses its triggers; PostgreSQL kept its CHECK constraint)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 14:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here (as in 0005): migrations never import the app.
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
NAME = "ck_jobs_status"


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    states = "(" + ", ".join(f"'{s}'" for s in JOB_STATES) + ")"
    for event, kind in (("INSERT", "insert"), ("UPDATE OF status", "update")):
        op.execute(
            f"CREATE TRIGGER IF NOT EXISTS {NAME}_{kind} BEFORE {event} ON jobs "
            f"WHEN NEW.status NOT IN {states} "
            f"BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: {NAME}'); END"
        )


def downgrade() -> None:
    # 0008 and earlier heads had no triggers on a rebuilt jobs table either; nothing to undo
    # that a downgrade could rely on, so the triggers stay (they only refuse unknown states).
    pass
