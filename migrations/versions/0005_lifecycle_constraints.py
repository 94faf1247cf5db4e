"""The lifecycle in the schema: every status column limited to its states, one active version
per model (service/domain/lifecycle.py owns the moves; the database refuses the impossible)

PostgreSQL gets CHECK constraints; SQLite gets the same rule as triggers (adding a CHECK there
means rebuilding the table). The partial unique index works on both.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 06:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here: migrations never import the app.
RULES = {
    ("jobs", "status"): ("queued", "running", "succeeded", "failed", "cancelled"),
    ("deletion_requests", "status"): (
        "queued",
        "running",
        "completed",
        "needs_review",
        "rejected",
        "failed",
        "cancelled",
    ),
    ("model_versions", "status"): ("active", "candidate", "superseded", "rejected"),
    ("records", "state"): ("present", "forgotten"),
}


def _name(table: str, column: str) -> str:
    return f"ck_{table}_{column}"


def _in(states: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{s}'" for s in states) + ")"


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for (table, column), states in RULES.items():
        name = _name(table, column)
        if not sqlite:
            op.create_check_constraint(name, table, f"{column} IN {_in(states)}")
            continue
        for event in ("INSERT", f"UPDATE OF {column}"):
            kind = "insert" if event == "INSERT" else "update"
            op.execute(
                f"CREATE TRIGGER {name}_{kind} BEFORE {event} ON {table} "
                f"WHEN NEW.{column} NOT IN {_in(states)} "
                f"BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: {name}'); END"
            )
    op.create_index(
        "uq_versions_one_active",
        "model_versions",
        ["model_id"],
        unique=True,
        postgresql_where=sa.text("status = 'active'"),
        sqlite_where=sa.text("status = 'active'"),
    )


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.drop_index("uq_versions_one_active", table_name="model_versions")
    for table, column in RULES:
        name = _name(table, column)
        if sqlite:
            op.execute(f"DROP TRIGGER IF EXISTS {name}_insert")
            op.execute(f"DROP TRIGGER IF EXISTS {name}_update")
        else:
            op.drop_constraint(name, table, type_="check")
