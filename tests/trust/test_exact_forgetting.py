"""Exact forgetting: a model registered with its training recipe is retrained without the
records when approximate forgetting cannot be shown (escalation), or when a request asks for
`method: "retrain"`. Real API, real Redis, a real `lethe worker` (Celery) subprocess and real
PostgreSQL; the memorising digits MLP of tests/trust/memorising.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.families import Family, family, request_rows
from tests.trust.conftest import PRODUCTION_POLICY, get, post, request_id_of, run
from tests.worker.harness import Stack, WorkerProcess, api_stack, poll, stack_settings, wait_until


@pytest.fixture(scope="module")
def flipped() -> Family:
    return family("flipped")


@pytest.fixture
def worker_stack(
    lethe_env: Path, postgres_url: str, redis_url: str, storage_dir: Path, tmp_path: Path
) -> Iterator[tuple[Stack, WorkerProcess]]:
    settings = stack_settings(
        database_url=postgres_url,
        storage_dir=storage_dir,
        broker_url=redis_url,
        **PRODUCTION_POLICY,
    )
    with api_stack(settings) as stack:
        worker = WorkerProcess.celery(settings, tmp_path / "worker.log").start()
        try:
            yield stack, worker
        finally:
            worker.stop()


def _request(stack: Stack, job: str) -> dict:
    return get(stack, f"/v1/deletion-requests/{request_id_of(stack, job)}").json()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_mislabelled_records_escalate_to_an_exact_retrain(
    worker_stack: tuple[Stack, WorkerProcess], flipped: Family
) -> None:
    stack, worker = worker_stack
    rows, _ = request_rows(flipped, "mislabelled3")
    keys = [flipped.ids[i] for i in rows]
    model = stack.register(flipped.trained(), "model", recipe=flipped.recipe_json())
    shown = get(stack, f"/v1/models/{model}").json()
    assert shown["recipe"]["epochs"] == flipped.recipe.epochs and len(shown["recipe_sha256"]) == 64
    job = stack.submit(model, keys)  # no params: IMU first
    done = stack.wait([job], timeout=600)[job]
    assert done["status"] == "succeeded", worker.log_text()[-3000:]
    request = _request(stack, job)
    assert request["status"] == "completed", request["policy"]
    assert request["forgetting"] == "exact"
    methods = [(a["method"], a["outcome"]) for a in request["attempts"]]
    assert methods == [("imu", "held"), ("retrain", "released")], request["attempts"]
    assert request["attempts"][0]["reason"] == "not-forgotten-within-guard"
    # The receipt says which kind of forgetting, and cites the recipe.
    receipt = poll(
        lambda: (
            (r := get(stack, f"/v1/deletion-requests/{request['id']}/receipt")).status_code == 200
            and r.json()
        ),
        timeout=30,
    )
    claim = receipt["payload"]["forgetting"]
    assert claim["kind"] == "exact" and claim["recipe_sha256"] == shown["recipe_sha256"]
    assert claim["attempts"] == ["imu", "retrain"]
    # The released model answers on those records as a model retrained without them does.
    version = request["result_version"]
    released = flipped.load(get(stack, f"/v1/model-versions/{version['id']}/checkpoint").content)
    reference = flipped.retrained(rows)
    with torch.no_grad():
        ours, theirs = released(flipped.x[rows]), reference(flipped.x[rows])
        agree = (released(flipped.x_eval).argmax(1) == reference(flipped.x_eval).argmax(1)).float()
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    assert float(agree.mean()) >= 0.98
    assert flipped.forget_acc(released, rows) == 0.0  # the wrong labels are gone
    assert flipped.heldout_acc(flipped.model) - flipped.heldout_acc(released) <= 0.03
    # The audit names both attempts.
    events = get(stack, "/v1/audit", action="version.created", limit=200).json()["items"]
    created = [e for e in events if e["payload"].get("job_id") == job]
    assert [a["method"] for a in created[0]["payload"]["attempts"]] == ["imu", "retrain"]
    # The model's approximate result was held and retraining cost no more than trying: the
    # next default request retrains at once (worker.routing) and says why.
    more, _ = request_rows(flipped, "mislabelled3", seed=5)
    more = [r for r in more if r not in rows]
    second = stack.submit(model, [flipped.ids[i] for i in more])
    assert stack.wait([second], timeout=600)[second]["status"] == "succeeded"
    request = _request(stack, second)
    assert request["status"] == "completed" and request["forgetting"] == "exact"
    (attempt,) = request["attempts"]
    assert attempt["method"] == "retrain" and attempt["outcome"] == "released", attempt
    instead = attempt["instead_of"]
    assert instead["method"] == "imu" and instead["exact_first"] and instead["held_share"] == 1.0
    assert instead["retrain_measured_by"] == job
    assert instead["retrain_s"] * (1 - instead["held_share"]) <= instead["approximate_s"]
    released = flipped.load(
        get(stack, f"/v1/model-versions/{request['result_version']['id']}/checkpoint").content
    )
    reference = flipped.retrained(sorted(rows + more))  # both requests' records are gone
    with torch.no_grad():
        assert torch.equal(
            released(flipped.x[more]).argmax(1), reference(flipped.x[more]).argmax(1)
        )
    assert flipped.forget_acc(released, more) <= 1 / 3  # at most one wrong label still given
    assert flipped.heldout_acc(flipped.model) - flipped.heldout_acc(released) <= 0.03


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_a_worker_killed_mid_retrain_finishes_the_job_once(
    worker_stack: tuple[Stack, WorkerProcess], flipped: Family
) -> None:
    stack, worker = worker_stack
    rows, _ = request_rows(flipped, "mislabelled3", seed=1)
    model = stack.register(
        flipped.trained(), "model", recipe={**flipped.recipe_json(), "epochs": 600}
    )
    job = stack.submit(model, [flipped.ids[i] for i in rows], method="retrain")
    wait_until(
        lambda: (row := stack.job_rows([job])[job]).phase == "retraining" and row.progress > 0.1,
        timeout=120,
        what="retrain under way",
    )
    worker.kill_group()
    worker.start()
    done = stack.wait([job], timeout=600)[job]
    assert done["status"] == "succeeded", worker.log_text()[-3000:]
    assert done["attempts"] == 2
    versions = stack.versions(model)
    assert [v["number"] for v in versions] == [1, 2] and versions[1]["job_id"] == job
    assert _request(stack, job)["forgetting"] == "exact"


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_a_retrain_is_cancelled_mid_epoch(
    worker_stack: tuple[Stack, WorkerProcess], flipped: Family
) -> None:
    stack, _ = worker_stack
    model = stack.register(
        flipped.trained(), "model", recipe={**flipped.recipe_json(), "epochs": 5000}
    )
    job = stack.submit(model, flipped.ids[:3], method="retrain")
    wait_until(lambda: stack.job_rows([job])[job].phase == "retraining", timeout=120)
    assert stack.cancel(job).status_code in (200, 202)
    done = stack.wait([job], timeout=120)[job]
    assert done["status"] == "cancelled"
    assert [v["number"] for v in stack.versions(model)] == [1]


def test_without_a_recipe_nothing_escalates_and_retrain_is_refused(
    prod_stack: Stack, flipped: Family
) -> None:
    stack = prod_stack
    rows, _ = request_rows(flipped, "mislabelled3")
    keys = [flipped.ids[i] for i in rows]
    model = stack.register(flipped.trained(), "model")
    resp = post(
        stack,
        "/v1/deletion-requests",
        json={
            "model": model,
            "dataset": stack.models[model],
            "record_keys": keys,
            "method": "retrain",
        },
    )
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "method"
    job = stack.submit(model, keys)
    from worker.context import Outcome

    assert run(stack, job) == Outcome.SUCCEEDED
    request = _request(stack, job)
    assert request["status"] == "needs_review" and request["forgetting"] == "approximate"
    assert request["policy"]["reason"] == "not-forgotten-within-guard"
    assert [a["method"] for a in request["attempts"]] == ["imu"]


@pytest.mark.parametrize(
    ("recipe", "field"),
    [
        ({"epochs": 0, "lr": 0.01}, "spec.recipe.epochs"),
        ({"epochs": 5, "lr": -1}, "spec.recipe.lr"),
        ({"epochs": 5, "lr": 0.01, "optimizer": "sgd"}, "spec.recipe.optimizer"),
        ({"epochs": 5, "lr": 0.01, "momentum": 0.9}, "spec.recipe.momentum"),
        ({"epochs": 5, "lr": 0.01, "datasets": ["EVAL"]}, "spec.recipe.datasets.0"),
        ({"epochs": 5, "lr": 0.01, "datasets": ["nope"]}, "spec.recipe.datasets.0"),
    ],
)
def test_an_invalid_recipe_is_refused_naming_the_field(
    sqlite_stack: Stack, flipped: Family, recipe: dict, field: str
) -> None:
    stack = sqlite_stack
    eval_id = stack.upload("recipe-eval", "eval", flipped.trained().eval_npz)
    datasets = [eval_id if d == "EVAL" else d for d in recipe.get("datasets", [eval_id])]
    if "datasets" not in recipe:
        datasets = [stack.upload("recipe-train", "train", flipped.trained().train_npz)]
    arch = {"in_features": 64, "hidden": [256], "num_classes": 10}
    spec = {
        "name": "r-mlp",
        "architecture": "mlp",
        "arch_kwargs": arch,
        "recipe": {**recipe, "datasets": datasets},
    }
    weights = ("w.safetensors", flipped.trained().weights["model"], "application/octet-stream")
    resp = post(stack, "/v1/models", data={"spec": json.dumps(spec)}, files={"weights": weights})
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert [e["field"] for e in resp.json()["errors"]] == [field]
    assert np.asarray(get(stack, "/v1/models").json()["items"]).size == 0
