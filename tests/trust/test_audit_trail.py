"""The audit trail: every state change leaves an event; filters and cursors; tampering with a
real trail (edit, delete) is named by seq through the API and `lethe audit verify` on SQLite and
PostgreSQL; concurrent writers keep seq gapless."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import delete, select, update
from typer.testing import CliRunner

from service.api.auth import create_key, revoke_key
from service.cli import app
from service.storage.db import make_engine, make_session_factory, transaction
from service.storage.tables import AuditEvent
from service.trust.audit import append_event, verify_chain
from tests.trust.conftest import get, post, run
from tests.worker.harness import Stack, Trained
from worker.context import Outcome


def _all_events(stack: Stack) -> list[dict]:
    items, cursor = [], None
    while True:
        params = {"limit": 50, **({"cursor": cursor} if cursor else {})}
        page = get(stack, "/v1/audit", **params).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def _flow(stack: Stack, trained: Trained) -> dict[str, str]:
    """One of every state change the service makes."""
    with transaction(stack.sessions) as session:
        key, _ = create_key(session, scope="read", name="auditor")
        revoke_key(session, "auditor")
    model = stack.register(trained, "mlp")
    done = stack.submit(model, trained.train_ids[:5])
    assert run(stack, done) == Outcome.SUCCEEDED
    held = stack.submit(model, trained.train_ids[5:10], params={"policy": {"require_review": True}})
    assert run(stack, held) == Outcome.SUCCEEDED
    candidate = stack.job(held)["result_version_id"]
    assert post(stack, f"/v1/model-versions/{candidate}/promote").status_code == 200
    held2 = stack.submit(
        model, trained.train_ids[10:15], params={"policy": {"require_review": True}}
    )
    assert run(stack, held2) == Outcome.SUCCEEDED
    rejected = stack.job(held2)["result_version_id"]
    assert post(stack, f"/v1/model-versions/{rejected}/reject").status_code == 200
    cancelled = stack.submit(model, trained.train_ids[15:20])
    assert stack.cancel(cancelled).status_code == 202
    # A text train set cannot be unlearned by this worker: the job fails with a clear error.
    texts = stack.client.post(
        "/v1/datasets",
        headers=stack.headers,
        data={"name": "notes", "kind": "text", "role": "train"},
        files={"file": ("n.jsonl", b'{"id": "n1", "text": "hello"}\n', "text/plain")},
    ).json()
    stack.models[model + "-text"] = texts["id"]
    body = {"model": model, "dataset": texts["id"], "record_keys": ["n1"]}
    failing = post(stack, "/v1/deletion-requests", json=body).json()["job"]["id"]
    assert run(stack, failing) == Outcome.FAILED
    return {
        "model": model,
        "done": done,
        "cancelled": cancelled,
        "failing": failing,
        "candidate": candidate,
        "rejected": rejected,
        "key": key.id,
    }


def test_every_state_change_is_audited(stack: Stack, trained: Trained) -> None:
    ids = _flow(stack, trained)
    events = _all_events(stack)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    actions = {e["action"] for e in events}
    expected = {
        "key.created",
        "key.revoked",
        "dataset.registered",
        "model.registered",
        "request.accepted",
        "job.claimed",
        "job.succeeded",
        "job.failed",
        "job.cancelled",
        "version.created",
        "version.promoted",
        "version.rejected",
        "version.retired",
        "records.forgotten",
        "content.purged",
    }
    assert expected <= actions, expected - actions
    by_subject = {}
    for e in events:
        by_subject.setdefault(e["subject_id"], []).append(e["action"])
    assert by_subject[ids["done"]] == ["job.claimed", "job.succeeded"]
    assert by_subject[ids["cancelled"]] == ["job.cancelled"]
    assert by_subject[ids["failing"]] == ["job.claimed", "job.failed"]
    assert by_subject[ids["candidate"]] == ["version.created", "version.promoted"]
    assert by_subject[ids["rejected"]] == ["version.created", "version.rejected", "version.retired"]
    assert by_subject[ids["key"]] == ["key.created", "key.revoked"]
    actors = {e["actor"] for e in events}
    assert any(a.startswith("worker:") for a in actors)
    assert any(a.startswith("key:") for a in actors)

    # Filters: subject (id or type:id), action, and a cursor that pages without overlap.
    job_events = get(stack, "/v1/audit", subject=f"job:{ids['done']}").json()["items"]
    assert [e["action"] for e in job_events] == ["job.claimed", "job.succeeded"]
    assert get(stack, "/v1/audit", subject=f"dataset:{ids['done']}").json()["items"] == []
    claimed = get(stack, "/v1/audit", action="job.claimed", limit=2).json()
    assert [e["action"] for e in claimed["items"]] == ["job.claimed"] * 2
    rest = get(stack, "/v1/audit", action="job.claimed", cursor=claimed["next_cursor"]).json()
    assert rest["items"] and rest["items"][0]["seq"] > claimed["items"][-1]["seq"]
    verified = get(stack, "/v1/audit/verify").json()
    assert verified["ok"] and verified["checked"] == len(events)
    assert verified["head_hash"] == events[-1]["hash"]


def test_tampering_with_a_real_trail_is_named_by_seq(
    stack: Stack, trained: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = stack.register(trained, "mlp")
    job = stack.submit(model, trained.train_ids[:5])
    assert run(stack, job) == Outcome.SUCCEEDED
    events = _all_events(stack)
    forgotten = next(e for e in events if e["action"] == "records.forgotten")
    monkeypatch.setenv("LETHE_DATABASE_URL", stack.settings.db_url)
    cli = CliRunner()
    assert cli.invoke(app, ["audit", "verify"]).exit_code == 0

    # Edit: someone shrinks the number of forgotten records.
    with transaction(stack.sessions) as session:
        session.execute(
            update(AuditEvent)
            .where(AuditEvent.seq == forgotten["seq"])
            .values(payload={**forgotten["payload"], "count": 1})
        )
    result = get(stack, "/v1/audit/verify").json()
    assert result["ok"] is False and result["first_bad_seq"] == forgotten["seq"]
    out = cli.invoke(app, ["audit", "verify", "--json"])
    assert out.exit_code == 1 and f'"first_bad_seq": {forgotten["seq"]}' in out.stdout

    # Restore it, then delete an earlier row: the gap is named.
    with transaction(stack.sessions) as session:
        session.execute(
            update(AuditEvent)
            .where(AuditEvent.seq == forgotten["seq"])
            .values(payload=forgotten["payload"])
        )
    assert get(stack, "/v1/audit/verify").json()["ok"] is True
    claimed = next(e for e in events if e["action"] == "job.claimed")
    with transaction(stack.sessions) as session:
        session.execute(delete(AuditEvent).where(AuditEvent.seq == claimed["seq"]))
    result = get(stack, "/v1/audit/verify").json()
    assert result["ok"] is False and result["first_bad_seq"] == claimed["seq"]
    assert cli.invoke(app, ["audit", "verify"]).exit_code == 1


@pytest.mark.postgres
def test_concurrent_writers_keep_seq_gapless_on_postgres(postgres_url: str) -> None:
    from service.storage import migrate

    migrate.upgrade(postgres_url)
    engine = make_engine(postgres_url, pool_size=8, max_overflow=4)
    factory = make_session_factory(engine)
    threads, per_thread = 8, 25
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def writer(n: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                with transaction(factory) as session:  # a separate session per append
                    append_event(
                        session,
                        actor=f"writer-{n}",
                        action="test.append",
                        subject_type="thing",
                        subject_id=f"{n}-{i}",
                        payload={"n": n, "i": i},
                    )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    pool = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=120)
    assert errors == []
    with factory() as session:
        seqs = list(session.execute(select(AuditEvent.seq).order_by(AuditEvent.seq)).scalars())
        writers = session.execute(select(AuditEvent.actor)).scalars().all()
        result = verify_chain(session)
    engine.dispose()
    assert seqs == list(range(1, threads * per_thread + 1))
    assert len(set(writers)) == threads
    assert result["ok"] and result["checked"] == threads * per_thread
