"""migrations/app_role.sql on real PostgreSQL: the application role serves the API, appends
audit events, and cannot UPDATE, DELETE or TRUNCATE them."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError

from service.storage import migrate
from service.storage.db import make_engine, make_session_factory, transaction
from service.trust.audit import append_event, verify_chain

pytestmark = pytest.mark.postgres
SQL = Path(__file__).resolve().parents[2] / "migrations" / "app_role.sql"


def _statements(role: str) -> list[str]:
    body = "\n".join(
        line for line in SQL.read_text().splitlines() if not line.lstrip().startswith("--")
    )
    body = body.replace(":app_role", role).replace(":app_password", "'pw'")
    return [s.strip() for s in body.split(";") if s.strip()]


def test_app_role_appends_but_cannot_rewrite_the_audit_log(postgres_url: str) -> None:
    migrate.upgrade(postgres_url)
    role = f"lethe_app_{uuid.uuid4().hex[:8]}"
    owner = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with owner.connect() as conn:
        for statement in _statements(role):
            conn.execute(text(statement))
    app_url = make_url(postgres_url).set(username=role, password="pw")
    engine = make_engine(app_url.render_as_string(hide_password=False))
    try:
        factory = make_session_factory(engine)
        migrate.check_at_head(engine)  # readiness works under the role
        with transaction(factory) as session:
            for i in range(3):
                append_event(
                    session, actor="app", action="test.event", subject_type="job", subject_id=str(i)
                )
        with factory() as session:
            assert verify_chain(session)["ok"] and verify_chain(session)["checked"] == 3
        for attack in (
            "UPDATE audit_events SET actor = 'x'",
            "DELETE FROM audit_events",
            "TRUNCATE audit_events",
            "DELETE FROM audit_head",
        ):
            with pytest.raises(ProgrammingError, match="permission denied"), engine.begin() as c:
                c.execute(text(attack))
        with factory() as session:
            assert verify_chain(session)["checked"] == 3
    finally:
        engine.dispose()
        with owner.connect() as conn:
            conn.execute(text(f'DROP OWNED BY "{role}"'))
            conn.execute(text(f'DROP ROLE "{role}"'))
        owner.dispose()
