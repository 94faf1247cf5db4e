"""The lifecycle module refuses illegal moves, and the schema (migration 0005) refuses states
that do not exist and a second active version, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from service.domain.lifecycle import (
    JOB_MOVES,
    REQUEST_MOVES,
    VERSION_MOVES,
    IllegalTransition,
    move_job,
    move_request,
    move_version,
    sources,
)
from service.domain.states import JobStatus, RequestStatus, VersionStatus
from service.storage import migrate
from service.storage.db import make_engine


def test_moves_follow_the_table_and_refuse_the_rest() -> None:
    for moves, move in (
        (JOB_MOVES, move_job),
        (REQUEST_MOVES, move_request),
        (VERSION_MOVES, move_version),
    ):
        for start, allowed in moves.items():
            for target in moves:
                row = SimpleNamespace(id="x", status=start)
                if target in allowed or target == start:
                    move(row, target)  # type: ignore[arg-type]
                    assert row.status == target
                else:
                    with pytest.raises(IllegalTransition, match=f"{start} → {target}"):
                        move(row, target)  # type: ignore[arg-type]
                    assert row.status == start
    assert sources(REQUEST_MOVES, RequestStatus.COMPLETED) == ("needs_review", "running")
    assert JobStatus.SUCCEEDED not in sources(JOB_MOVES, JobStatus.RUNNING)
    # Terminal states stay terminal; a superseded version never comes back.
    row = SimpleNamespace(id="v", status=VersionStatus.SUPERSEDED)
    with pytest.raises(IllegalTransition):
        move_version(row, VersionStatus.ACTIVE)


def _seed(conn) -> None:
    conn.execute(
        text(
            "INSERT INTO models (id, name, architecture, arch_kwargs, created_at) "
            "VALUES ('m', 'm', 'mlp', '{}', CURRENT_TIMESTAMP)"
        )
    )
    for n, status in ((1, "superseded"), (2, "active"), (3, "candidate")):
        conn.execute(
            text(
                "INSERT INTO model_versions (id, model_id, number, sha256, size_bytes, status, "
                "metrics, created_at) VALUES (:id, 'm', :n, :sha, 1, :s, '{}', "
                "CURRENT_TIMESTAMP)"
            ),
            {"id": f"v{n}", "n": n, "sha": hashlib.sha256(bytes([n])).hexdigest(), "s": status},
        )


def _rule_names(tables: set[str]) -> list[str]:
    column = {"records": "state"}
    return [f"ck_{t}_{column.get(t, 'status')}" for t in sorted(tables)]


def test_the_schema_refuses_unknown_states_and_two_active_versions(database_url: str) -> None:
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            _seed(conn)
        bad = [
            "UPDATE model_versions SET status = 'activ' WHERE id = 'v3'",
            "UPDATE model_versions SET status = 'active' WHERE id = 'v3'",  # a second active
        ]
        for statement in bad:
            with pytest.raises(IntegrityError), engine.begin() as conn:
                conn.execute(text(statement))
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO model_versions (id, model_id, number, sha256, size_bytes, status, "
                    "metrics, created_at) VALUES ('v9', 'm', 9, 'x', 1, 'draft', '{}', "
                    "CURRENT_TIMESTAMP)"
                )
            )
        # The legal order: the active one steps down first, then the candidate moves up.
        with engine.begin() as conn:
            conn.execute(text("UPDATE model_versions SET status = 'superseded' WHERE id = 'v2'"))
            conn.execute(text("UPDATE model_versions SET status = 'active' WHERE id = 'v3'"))
        with engine.connect() as conn:
            active = (
                conn.execute(text("SELECT id FROM model_versions WHERE status = 'active'"))
                .scalars()
                .all()
            )
        assert active == ["v3"]
        # Records: present or forgotten, nothing else.
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO datasets (id, name, kind, role, storage_key, sha256, "
                    "content_sha256, size_bytes, record_count, meta, created_at) VALUES ('d', 'd', "
                    "'tensor', 'train', 'k', 's', 's', 1, 1, '{}', CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO records (dataset_id, key, row, content_sha256, state) "
                    "VALUES ('d', 'r', 0, 's', 'present')"
                )
            )
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text("UPDATE records SET state = 'deleted' WHERE key = 'r'"))
        # Every status column keeps its rule at head (a table rebuilt by a later migration
        # must not lose it): a CHECK constraint, or SQLite's insert and update triggers.
        rules = {"jobs", "deletion_requests", "model_versions", "records"}
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                names = conn.execute(
                    text("SELECT name FROM sqlite_master WHERE type = 'trigger'")
                ).scalars()
                expected = {f"{t}_{k}" for t in _rule_names(rules) for k in ("insert", "update")}
            else:
                names = conn.execute(
                    text("SELECT conname FROM pg_constraint WHERE contype = 'c'")
                ).scalars()
                expected = set(_rule_names(rules))
            assert expected <= set(names)
    finally:
        engine.dispose()
