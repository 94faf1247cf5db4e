"""One pass per set per evaluation (worker/imu/set_outputs.py, worker/job_metrics.py): the
numbers are the ones a plain evaluation computes, each set goes through the model once,
and logits carried to the same model state make its next evaluation pass only new sets."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from worker.imu import evaluate
from worker.imu.checks import model_logits
from worker.imu.membership import MembershipTest
from worker.imu.set_outputs import SetOutputs, set_key
from worker.job_metrics import job_metrics


class RowCounter:
    """Counts the rows each forward pass of ``model`` sees."""

    def __init__(self, model: nn.Module) -> None:
        self.rows: list[int] = []
        model.register_forward_hook(lambda _m, args, _o: self.rows.append(int(args[0].shape[0])))


@pytest.fixture
def request_sets(digits, trained_cnn):
    model = copy.deepcopy(trained_cnn)
    x, y = digits.x_train, digits.y_train
    forget = (x[:40], y[:40])
    members = (x[40:640], y[40:640])
    probe = (x[640:900], y[640:900])
    nonmembers = (digits.x_test, digits.y_test)  # the whole eval set
    rows = list(range(1, nonmembers[1].numel(), 2))  # the policy half, as the loader picks
    eval_pair = (nonmembers[0][rows].clone(), nonmembers[1][rows].clone())
    test = MembershipTest(forget, members, nonmembers, class_wise=False)
    return model, forget, members, probe, nonmembers, rows, eval_pair, test


def test_keys_follow_content_not_identity() -> None:
    a = torch.arange(12.0).reshape(3, 4)
    assert set_key(a) == set_key(a.clone())
    assert set_key(a) != set_key(a + 1) and set_key(a) != set_key(a.double())
    assert set_key(a) != set_key(a.reshape(4, 3))


def test_each_set_goes_through_the_model_once_and_numbers_match(request_sets) -> None:
    model, forget, members, probe, nonmembers, rows, eval_pair, test = request_sets
    counter = RowCounter(model)
    outputs = SetOutputs(model)
    metrics = job_metrics(
        model,
        forget=forget,
        eval_pair=eval_pair,
        member_probe=probe,
        class_wise=False,
        membership=test,
        outputs=outputs,
        eval_rows=rows,
    )
    # forget, whole eval set (the policy half is taken from it), member probe, member sample;
    # the passes go in batches of 512 rows, so the rows add up to one pass of each.
    sizes = [forget[1].numel(), nonmembers[1].numel(), probe[1].numel(), test.members[1].numel()]
    assert sum(counter.rows) == sum(sizes), (counter.rows, sizes)
    assert outputs.forwards == 4
    # The same numbers a plain evaluation computes with its own passes.
    plain = evaluate(model, forget=forget, eval=eval_pair, member_probe=probe)
    for name in ("forget_acc", "eval_acc", "member_probe_acc", "mia_efficacy", "mia_entropy"):
        assert metrics[name] == pytest.approx(plain[name], abs=1e-12), name
    own = test.assess(lambda inputs: model_logits(model, inputs)()).as_dict()
    assert metrics["membership"]["outcome"] == own["outcome"]
    assert metrics["membership"]["statistic"] == pytest.approx(own["statistic"], abs=1e-3)
    assert set(metrics["per_class_acc"]) == {str(c) for c in range(10)}


def test_carried_logits_spare_every_seen_set(request_sets) -> None:
    model, forget, members, probe, nonmembers, rows, eval_pair, test = request_sets
    first = SetOutputs(model)
    kw = {
        "eval_pair": eval_pair,
        "member_probe": probe,
        "class_wise": False,
        "membership": test,
        "eval_rows": rows,
    }
    after = job_metrics(model, forget=forget, outputs=first, **kw)
    reloaded = copy.deepcopy(model)  # the checkpoint the next job loads
    carried = SetOutputs(reloaded, carry=first.entries())
    again = job_metrics(reloaded, forget=forget, outputs=carried, **kw)
    assert carried.forwards == 0
    assert again == after
    # A new forget set is the only pass the next job's "before" makes.
    nxt = (members[0][:10].clone(), members[1][:10].clone())
    test2 = MembershipTest(nxt, members, nonmembers, class_wise=False)
    carried2 = SetOutputs(reloaded, carry=first.entries())
    job_metrics(reloaded, forget=nxt, outputs=carried2, **{**kw, "membership": test2})
    # members[:10] were scored as part of the member sample only if sampled; at most the
    # forget set and the new test's member sample (another seed draw of the same rows) pass.
    assert carried2.forwards <= 2
