"""Retirement of superseded checkpoints: at once by default, after the retention period
otherwise (the reaper), never the active or a candidate; downloads of retired ones are 410."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from service.storage.db import transaction
from service.storage.objects import Storage
from service.storage.tables import ModelVersion, utcnow
from tests.trust.conftest import get, run
from tests.worker.harness import Stack, Trained
from worker.context import Outcome
from worker.reaper import Reaper


def _checkpoint_files(stack: Stack) -> list[str]:
    return sorted(Storage(stack.settings.storage).iter_keys("checkpoints/"))


def test_superseded_checkpoints_are_deleted_at_once(stack: Stack, trained: Trained) -> None:
    model = stack.register(trained, "mlp")
    v1 = stack.versions(model)[0]
    assert get(stack, f"/v1/model-versions/{v1['id']}/checkpoint").status_code == 200
    job = stack.submit(model, trained.train_ids[:5])
    assert run(stack, job) == Outcome.SUCCEEDED
    v1, v2 = stack.versions(model)
    assert v1["status"] == "superseded" and v1["retired_at"] is not None
    assert not v1["checkpoint_available"] and v2["checkpoint_available"]
    with stack.sessions() as session:
        row = session.get(ModelVersion, v2["id"])
        assert row is not None
        assert _checkpoint_files(stack) == [row.storage_key]  # version 1's file is gone
    gone = get(stack, f"/v1/model-versions/{v1['id']}/checkpoint")
    assert gone.status_code == 410
    assert gone.headers["content-type"].startswith("application/problem+json")
    problem = gone.json()
    assert problem["type"].endswith("/checkpoint-retired") and problem["status"] == 410
    assert problem["sha256"] == v1["sha256"] and problem["retired_at"] == v1["retired_at"]
    # Metadata stays: sha256, size, lineage.
    shown = get(stack, f"/v1/model-versions/{v1['id']}").json()
    assert shown["sha256"] == v1["sha256"] and shown["size_bytes"] > 0
    events = get(stack, "/v1/audit", subject=v1["id"], action="version.retired").json()["items"]
    assert len(events) == 1 and events[0]["payload"]["sha256"] == v1["sha256"]
    ok = get(stack, f"/v1/model-versions/{v2['id']}/checkpoint")
    assert ok.status_code == 200 and ok.headers["etag"] == f'"{v2["sha256"]}"'


@pytest.mark.parametrize("sqlite_stack", [{"superseded_retention_s": 3600.0}], indirect=True)
def test_positive_retention_is_applied_by_the_reaper(sqlite_stack: Stack, trained: Trained) -> None:
    stack = sqlite_stack
    model = stack.register(trained, "mlp")
    job = stack.submit(model, trained.train_ids[:5])
    assert run(stack, job) == Outcome.SUCCEEDED
    v1, v2 = stack.versions(model)
    assert v1["status"] == "superseded" and v1["retired_at"] is None
    assert get(stack, f"/v1/model-versions/{v1['id']}/checkpoint").status_code == 200
    reaper = Reaper(stack.settings, stack.sessions, Storage(stack.settings.storage), actor="t")
    assert reaper.tick().retired == []  # not due yet
    with transaction(stack.sessions) as session:  # an hour and a second later
        session.execute(
            update(ModelVersion)
            .where(ModelVersion.id == v1["id"])
            .values(superseded_at=utcnow() - timedelta(seconds=3601))
        )
    assert reaper.tick().retired == [v1["id"]]
    assert get(stack, f"/v1/model-versions/{v1['id']}/checkpoint").status_code == 410
    assert get(stack, f"/v1/model-versions/{v2['id']}/checkpoint").status_code == 200
    assert reaper.tick().retired == []


def test_active_and_candidate_are_never_retired(
    sqlite_stack: Stack, trained: Trained, tmp_path: Path
) -> None:
    stack = sqlite_stack
    model = stack.register(trained, "mlp")
    job = stack.submit(model, trained.train_ids[:5], params={"policy": {"require_review": True}})
    assert run(stack, job) == Outcome.SUCCEEDED
    reaper = Reaper(stack.settings, stack.sessions, Storage(stack.settings.storage), actor="t")
    assert reaper.tick().retired == []
    v1, v2 = stack.versions(model)
    assert (v1["status"], v2["status"]) == ("active", "candidate")
    for version in (v1, v2):
        assert get(stack, f"/v1/model-versions/{version['id']}/checkpoint").status_code == 200
    assert len(_checkpoint_files(stack)) == 2
    # A later job still starts from the active version 1, whose checkpoint is intact.
    later = stack.submit(model, trained.train_ids[5:10])
    assert run(stack, later) == Outcome.SUCCEEDED
    assert stack.versions(model)[-1]["parent_id"] == v1["id"]
