"""Released means forgotten: default requests on models that memorise, over HTTP to the API,
run by a real worker process (`python -m worker.embedded`, the executor `lethe serve` runs),
with the production policy, judged against a model the test retrains without the records.

Each request ends either `completed`, with per-record evidence that matches the retrained
reference (the same membership test on both, the released model not remembering where the
reference forgot, held-out accuracy kept), or `needs_review` with a named reason. Never
`completed` while the records are still remembered. The original model's evidence shows the
test has the power to tell: it says `remembered` for the memorised sets.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.families import Family, family, request_rows
from tests.trust.conftest import get, request_id_of
from tests.worker.harness import Stack, WorkerProcess, poll

FORGETTING_HELD = {
    "not-forgotten-within-guard",
    "insufficient-evidence",
    "over-forgotten",
    "remembered",
}
# A result may also be held for its utility (the policy half dropped more than the guard's).
HELD_REASONS = FORGETTING_HELD | {"eval_acc_drop-failed"}
CASES = [
    ("flipped", "mislabelled3"),
    ("flipped", "random30"),
    ("flipped", "class"),
    ("noisy", "random3"),
    ("noisy", "random30"),
    ("noisy", "class"),
]


@pytest.fixture(scope="module")
def families() -> dict[str, Family]:
    return {name: family(name) for name in ("flipped", "noisy")}


@pytest.fixture
def worker_stack(prod_stack: Stack, tmp_path: Path) -> Iterator[Stack]:
    worker = WorkerProcess.embedded(prod_stack.settings, tmp_path / "worker.log").start()
    try:
        yield prod_stack
    finally:
        worker.stop()


def test_the_families_memorise(families: dict[str, Family]) -> None:
    for fam in families.values():
        everything = list(range(len(fam.y)))
        assert fam.forget_acc(fam.model, everything) == 1.0, fam.name
        assert fam.heldout_acc(fam.model) < 0.95, fam.name  # and do not merely generalise


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kind"), CASES)
def test_default_request_is_completed_only_when_forgotten(
    worker_stack: Stack, families: dict[str, Family], name: str, kind: str
) -> None:
    fam = families[name]
    stack = worker_stack
    rows, class_wise = request_rows(fam, kind)
    keys = [fam.ids[i] for i in rows]
    model = stack.register(fam.trained(), "model")
    job = stack.submit(model, keys)  # no params at all
    assert stack.wait([job], timeout=300)[job]["status"] == "succeeded"
    request = get(stack, f"/v1/deletion-requests/{request_id_of(stack, job)}").json()
    evidence, policy = request["evidence"], request["policy"]
    assert evidence is not None and evidence["n"] == len(keys)
    assert len(evidence["per_record_z"]) == len(keys)
    assert ("same-class" in evidence["test"]) == class_wise

    # The source model: the test sees its memorisation (otherwise it could prove nothing).
    original = fam.evidence(fam.model, rows, class_wise)
    if kind in ("mislabelled3", "random30", "class"):
        assert original.outcome == "remembered", original.as_dict()
    assert evidence["before"]["outcome"] == original.outcome

    reference = fam.retrained(rows)
    skip = int(fam.y[rows[0]]) if class_wise else None
    if request["status"] == "needs_review":
        assert policy["reason"] in HELD_REASONS, policy
        if policy["reason"] in FORGETTING_HELD:
            assert not evidence["releases"] and "membership" in policy["failed"]
        assert set(stack.record_states(stack.models[model], keys).values()) == {"present"}
        return
    assert request["status"] == "completed", request["status"]
    assert evidence["releases"] and policy["failed"] == []
    version = request["result_version"]
    weights = get(stack, f"/v1/model-versions/{version['id']}/checkpoint").content
    released = fam.load(weights)
    ours, theirs = (
        fam.evidence(released, rows, class_wise),
        fam.evidence(reference, rows, class_wise),
    )
    # The same test, run by the user on the download, agrees with the service...
    assert ours.outcome == evidence["outcome"]
    assert ours.statistic == pytest.approx(evidence["statistic"], abs=1e-3)
    # ...and the released model sits where retraining puts the records: no more member-like
    # than a retrained model plausibly is (its Z is about N(0, 1) across retrains; this one
    # reference is a single draw, so it is floored at the null's centre).
    assert ours.statistic <= max(theirs.statistic, 0.0) + 1.96, (ours.as_dict(), theirs.as_dict())
    assert fam.forget_acc(released, rows) <= fam.forget_acc(reference, rows) + 0.34
    # The receipt says `approximate` and carries the evidence it was released on.
    receipt = poll(
        lambda: (
            (r := get(stack, f"/v1/deletion-requests/{request['id']}/receipt")).status_code == 200
            and r.json()
        ),
        timeout=30,
    )
    claim = receipt["payload"]["forgetting"]
    assert claim["kind"] == "approximate" and claim["attempts"] == ["imu"]
    assert claim["evidence"]["statistic"] == evidence["statistic"]
    assert (
        claim["evidence"]["outcome"] == evidence["outcome"]
        and "per_record_z" not in claim["evidence"]
    )
    # Useful on every held-out record (both halves), within the policy's bound.
    drop = fam.heldout_acc(fam.model, skip) - fam.heldout_acc(released, skip)
    assert drop <= 0.05, drop
