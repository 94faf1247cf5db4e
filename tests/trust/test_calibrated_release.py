"""A deletion request with no params, judged as a user would: through the HTTP API with the
production release policy, the released checkpoint downloaded and scored on held-out data.

Digits MLP and BatchNorm CNN trained here on 1200 records, and a Fashion-MNIST MLP trained
on 3000 images with 2000 held-out images of the same split as its eval set (the controller
was tuned on none of them); class-wise and random requests. A model registered without an
eval dataset shows the policy failing safe.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from bench.data import find_fashion_mnist, load_fashion_mnist
from tests.trust.conftest import get, post, request_id_of, run
from tests.worker.harness import (
    Stack,
    Trained,
    image_npz,
    npz,
    train_models,
)
from worker.context import Outcome
from worker.imu.architectures import build
from worker.imu.checkpoints import load_state_dict, to_bytes
from worker.imu.train import accuracy, fit


@pytest.fixture(scope="module")
def deployed() -> Trained:
    """Models as a team would deploy them: all 1200 training records, BatchNorm in the CNN."""
    return train_models(n_train=1200, epochs=25, batch_norm=True)


FASHION = find_fashion_mnist()


@pytest.fixture(scope="module")
def fashion_deployed() -> Trained:
    """A Fashion-MNIST MLP (784-256-10) on 3000 images; its eval set is 2000 held-out images of
    the training split, drawn like the training records (ALGORITHM.md §5 says why)."""
    assert FASHION is not None
    data = load_fashion_mnist(FASHION, n_train=5000, n_test=10, seed=0)
    perm = torch.randperm(5000, generator=torch.Generator().manual_seed(0))
    x = data.x_train.reshape(5000, -1).numpy()
    y = data.y_train.numpy()
    tr, ev = perm[:3000].numpy(), perm[3000:].numpy()
    torch.manual_seed(0)
    spec = {"in_features": 784, "hidden": [256], "num_classes": 10}
    model = build("mlp", **spec)
    fit(model, torch.from_numpy(x[tr]), torch.from_numpy(y[tr]), epochs=10, lr=1e-3, seed=0)
    ids = [f"f{i:04d}" for i in range(3000)]
    return Trained(
        train_npz=npz(ids, x[tr], y[tr]),
        eval_npz=npz([f"h{i:04d}" for i in range(2000)], x[ev], y[ev]),
        probe_npz=npz(ids[-300:], x[tr][-300:], y[tr][-300:]),
        train_ids=ids,
        weights={"mlp": to_bytes(model)},
        specs={"mlp": ("mlp", spec)},
    )


def _arrays(npz: bytes) -> tuple[list[str], np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(npz), allow_pickle=False) as f:
        return [str(i) for i in f["ids"]], f["inputs"], f["labels"]


def _heldout_accuracy(
    trained: Trained, label: str, weights: bytes, forget_class: int | None
) -> float:
    """Score a checkpoint on every eval record (classes being forgotten left out)."""
    arch, kwargs = trained.specs[label]
    model = build(arch, **kwargs)
    model.load_state_dict(load_state_dict(weights))
    eval_npz = trained.eval_npz if arch == "mlp" else image_npz(trained.eval_npz)
    _, x, y = _arrays(eval_npz)
    keep = y != forget_class if forget_class is not None else np.ones(len(y), dtype=bool)
    return accuracy(model.eval(), torch.from_numpy(x[keep]), torch.from_numpy(y[keep]))


@pytest.mark.parametrize("label", ["mlp", "cnn"])
@pytest.mark.parametrize("scenario", ["class", "random"])
def test_default_request_is_released_forgotten_and_useful(
    prod_stack: Stack, deployed: Trained, label: str, scenario: str
) -> None:
    _released_forgotten_and_useful(prod_stack, deployed, label, scenario, forget=7)


@pytest.mark.skipif(
    FASHION is None,
    reason="Fashion-MNIST files absent: `apt-get install dataset-fashion-mnist` (.ci/run does)",
)
@pytest.mark.parametrize("scenario", ["class", "random"])
def test_default_request_on_a_fashion_mnist_model_is_released_forgotten_and_useful(
    prod_stack: Stack, fashion_deployed: Trained, scenario: str
) -> None:
    if scenario == "class":
        _released_forgotten_and_useful(prod_stack, fashion_deployed, "mlp", scenario, forget=1)
        return
    # This MLP memorises (train 0.93, held-out 0.86): its 270 random records score like its
    # members (Z ≈ 6.5, a set it never saw ≈ 0), and head-only ascent within the guard
    # cannot change that. Released, it would be a false release: it is held, saying why.
    stack, trained = prod_stack, fashion_deployed
    model = stack.register(trained, "mlp")
    keys = _random_keys(trained)
    job = stack.submit(model, keys)
    assert run(stack, job) == Outcome.SUCCEEDED
    request = get(stack, f"/v1/deletion-requests/{request_id_of(stack, job)}").json()
    evidence, policy = request["evidence"], request["policy"]
    assert request["status"] == "needs_review"
    assert policy["reason"] == "not-forgotten-within-guard" and policy["failed"] == ["membership"]
    assert evidence["outcome"] == "remembered" and evidence["n"] == len(keys)
    assert evidence["advantage"] > evidence["max_advantage"]  # the model has a signal
    assert evidence["statistic"] > evidence["band"][1] and evidence["false_release_rate"] > 0.05
    assert len(evidence["per_record_z"]) == len(keys)
    assert set(stack.record_states(stack.models[model], keys).values()) == {"present"}


def _random_keys(trained: Trained) -> list[str]:
    """A tenth of the training records, the member probe (the last 300) left out."""
    ids = _arrays(trained.train_npz)[0]
    pool = ids[:-300]
    rng = np.random.default_rng(11)
    return [pool[i] for i in sorted(rng.choice(len(pool), size=len(pool) // 10, replace=False))]


def _released_forgotten_and_useful(
    stack: Stack, trained: Trained, label: str, scenario: str, *, forget: int
) -> None:
    model = stack.register(trained, label)
    ids, _, labels = _arrays(trained.train_npz)
    if scenario == "class":
        forget_class: int | None = forget
        keys = [k for k, c in zip(ids, labels, strict=True) if c == forget_class]
    else:
        forget_class = None
        keys = _random_keys(trained)
    job = stack.submit(model, keys)  # no params at all
    assert run(stack, job) == Outcome.SUCCEEDED
    request = get(stack, f"/v1/deletion-requests/{request_id_of(stack, job)}").json()
    view = stack.job(job)
    metrics = view["metrics"]
    policy = metrics["policy"]
    calibration = metrics["influence"]["calibration"]
    start = metrics["before"]["membership"]
    # The model may tell these records from unseen ones per record (on some CPUs' numerics
    # the BatchNorm CNN lands just over the limit: advantage 0.102 > 0.1); if IMU within the
    # guard cannot show them forgotten, the honest answer is to hold, saying why.
    signal = scenario == "random" and start["advantage"] > start["max_advantage"]
    if signal and request["status"] == "needs_review":
        assert policy["reason"] in ("not-forgotten-within-guard", "insufficient-evidence")
        assert set(stack.record_states(stack.models[model], keys).values()) == {"present"}
        return
    assert request["status"] == "completed", json.dumps([policy, calibration])[:4000]
    assert policy["decision"] == "active" and policy["failed"] == []
    # The job view shows the controller's record of what it did.
    assert calibration["mode"] == "auto" and "trajectory" in calibration
    assert {"reason", "steps", "lr", "alpha", "backtracks"} <= set(calibration)
    split = metrics["eval_split"]
    n_eval = len(_arrays(trained.eval_npz)[0])
    assert split["n_guard"] + split["n_policy"] == n_eval and not split["shared"]
    assert metrics["after"]["n_eval"] == split["n_policy"]  # the policy judged its own half

    v1, v2 = stack.versions(model)
    assert v2["status"] == "active" and v1["status"] == "superseded"
    # Superseded weights are retired once a version passed the policy.
    assert not v1["checkpoint_available"]
    download = get(stack, f"/v1/model-versions/{v2['id']}/checkpoint")
    assert download.status_code == 200
    before = _heldout_accuracy(trained, label, trained.weights[label], forget_class)
    after = _heldout_accuracy(trained, label, download.content, forget_class)
    if scenario == "class":
        assert metrics["after"]["forget_acc"] <= 0.05
        assert calibration["reason"] == "target-reached"
        m_before = metrics["before"]["eval_acc_retained_classes"]
        m_after = metrics["after"]["eval_acc_retained_classes"]
    else:
        m_before, m_after = metrics["before"]["eval_acc"], metrics["after"]["eval_acc"]
    # Released with its evidence: the records sit inside the non-member band.
    evidence = request["evidence"]
    assert evidence["releases"] and evidence["n"] == len(keys)
    assert evidence["band"][0] <= evidence["statistic"] <= evidence["band"][1]
    assert m_before - m_after <= 0.03, (m_before, m_after)
    # On all held-out records (both halves), from the downloaded checkpoint.
    assert before - after <= 0.03, (before, after)
    states = stack.record_states(stack.models[model], keys)
    assert set(states.values()) == {"forgotten"}
    assert json.dumps(view)


def test_without_an_eval_dataset_nothing_is_activated_or_deleted(
    prod_stack: Stack, trained: Trained
) -> None:
    stack = prod_stack
    train_id = stack.upload("solo-train", "train", trained.train_npz)
    arch, kwargs = trained.specs["mlp"]
    spec = {"name": "solo-mlp", "architecture": arch, "arch_kwargs": kwargs}
    resp = post(
        stack,
        "/v1/models",
        data={"spec": json.dumps(spec)},
        files={"weights": ("w.safetensors", trained.weights["mlp"], "application/octet-stream")},
    )
    assert resp.status_code == 201, resp.text
    stack.models["solo-mlp"] = train_id
    ids, _, labels = _arrays(trained.train_npz)
    keys = [k for k, c in zip(ids, labels, strict=True) if c == 4]
    job = stack.submit("solo-mlp", keys)
    assert run(stack, job) == Outcome.SUCCEEDED
    v1, v2 = stack.versions("solo-mlp")
    policy = v2["metrics"]["policy"]
    assert v2["status"] == "candidate" and v1["status"] == "active"
    assert "eval_acc_drop" in policy["failed"]
    assert any("not measured" in r and "eval" in r for r in policy["reasons"])
    # Version 1's weights are kept until a version passes or a reviewer promotes one.
    assert v1["checkpoint_available"] and v2["checkpoint_available"]
    request = get(stack, f"/v1/deletion-requests/{request_id_of(stack, job)}").json()
    assert request["status"] == "needs_review"
    assert set(stack.record_states(train_id, keys).values()) == {"present"}


def test_records_that_already_look_unseen_leave_the_weights_unchanged(
    prod_stack: Stack, deployed: Trained
) -> None:
    """Records the model never fitted (here: held-out digits registered as its training
    set): the controller returns θ₀ (`target-at-start`), yet the request completes as usual —
    a new version, the records forgotten and their content purged."""
    from sqlalchemy import select

    from service.storage.tables import Record

    stack, trained = prod_stack, deployed
    model = stack.register(trained, "mlp")
    # Swap in a "training" set made of records the model never saw, then forget some. (They
    # are the eval records themselves, so their losses are the held-out distribution.)
    unseen_id = stack.upload("unseen-as-train", "train", trained.eval_npz)
    stack.models[model] = unseen_id
    ids, _, _ = _arrays(trained.eval_npz)
    keys = ids[:40]
    job = stack.submit(model, keys)
    assert run(stack, job) == Outcome.SUCCEEDED
    metrics = stack.job(job)["metrics"]
    assert metrics["influence"]["calibration"]["reason"] == "target-at-start"
    assert metrics["influence"]["calibration"]["steps"] == 0
    request = get(stack, f"/v1/deletion-requests/{request_id_of(stack, job)}").json()
    assert request["status"] == "completed"
    v1, v2 = stack.versions(model)
    assert v2["status"] == "active" and v2["number"] == 2
    download = get(stack, f"/v1/model-versions/{v2['id']}/checkpoint")
    new, old = load_state_dict(download.content), load_state_dict(trained.weights["mlp"])
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old)
    with stack.sessions() as session:
        rows = (
            session.execute(
                select(Record).where(Record.dataset_id == unseen_id, Record.key.in_(keys))
            )
            .scalars()
            .all()
        )
    assert len(rows) == len(keys)
    assert all(r.state == "forgotten" and r.purged_at is not None for r in rows)
