"""evaluate(): accuracies and the SVC membership-inference attack (ALGORITHM.md §6)."""

from __future__ import annotations

import json

import pytest
import torch

from worker.imu import evaluate
from worker.imu.architectures import build
from worker.imu.train import fit

LABEL_AWARE = ("mia_confidence", "mia_m_entropy", "mia_correctness")


@pytest.fixture(scope="module")
def memorised(digits):
    """An MLP that memorised 300 digits with random labels (Zhang et al., 2017): it can only
    be right on its members, the cleanest possible membership signal. Returns the model and
    index ranges into the shuffled training images."""
    x = digits.flat(digits.x_train)
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = build("mlp", in_features=64, hidden=[256], num_classes=10).double()
    fit(model, x[:300], y[:300], epochs=100, lr=3e-3, batch_size=32, seed=0, device="cpu")
    return model, x, y


def test_mia_separates_members_from_unseen_data(memorised) -> None:
    model, x, y = memorised
    probe, other_members = (x[:150], y[:150]), (x[150:300], y[150:300])
    eval_set, unseen = (x[600:900], y[600:900]), (x[900:1100], y[900:1100])
    on_unseen = evaluate(model, forget=unseen, eval=eval_set, member_probe=probe)
    on_members = evaluate(model, forget=other_members, eval=eval_set, member_probe=probe)
    assert on_members["forget_acc"] == 1.0 and on_unseen["forget_acc"] < 0.3
    for key in LABEL_AWARE:
        assert on_unseen[key] >= 0.8, (key, on_unseen[key])
        assert on_members[key] <= 0.05, (key, on_members[key])
    # The softmax-vector attack sees no label: overconfident wrong answers look like
    # members, so its signal is weaker; it must still rank unseen data above members.
    assert on_unseen["mia_efficacy"] >= on_members["mia_efficacy"] + 0.1
    assert set(on_unseen) >= {
        "forget_acc",
        "eval_acc",
        "member_probe_acc",
        "mia_efficacy",
        "mia_confidence",
        "mia_entropy",
        "mia_m_entropy",
        "mia_correctness",
        "n_forget",
        "n_eval",
        "n_member_probe",
    }
    assert json.loads(json.dumps(on_unseen)) == on_unseen
    assert all(type(v) in (int, float) for v in on_unseen.values())


def test_without_member_probe_mia_is_absent(trained_cnn, digits) -> None:
    res = evaluate(
        trained_cnn,
        forget=(digits.x_train[:50], digits.y_train[:50]),
        eval=(digits.x_test, digits.y_test),
    )
    assert not any(k.startswith("mia") for k in res)
    assert res["forget_acc"] >= 0.95 and res["eval_acc"] >= 0.95
    assert "member_probe_acc" not in res and res["n_eval"] == digits.y_test.shape[0]


def test_degenerate_sets_give_an_error_not_numbers(trained_cnn, digits) -> None:
    xf, yf = digits.x_train[:5], digits.y_train[:5]
    res = evaluate(
        trained_cnn,
        forget=(xf, yf),
        eval=(digits.x_test[:0], digits.y_test[:0]),
        member_probe=(digits.x_train[5:20], digits.y_train[5:20]),
    )
    assert "mia_error" in res and "eval" in res["mia_error"]
    assert not any(k.startswith("mia_") and k != "mia_error" for k in res)
    assert "eval_acc" not in res and res["n_eval"] == 0
    # A one-record probe of a single class still trains (1 member vs 1 non-member).
    tiny = evaluate(
        trained_cnn,
        forget=(xf, yf),
        eval=(digits.x_test[:1], digits.y_test[:1]),
        member_probe=(digits.x_train[5:6], digits.y_train[5:6]),
    )
    assert "mia_error" in tiny or 0.0 <= tiny["mia_efficacy"] <= 1.0
    json.dumps(tiny)


def test_a_diverged_model_reports_mia_error(digits) -> None:
    torch.manual_seed(0)
    model = build("mlp", in_features=64, hidden=[8], num_classes=10).double()
    with torch.no_grad():
        model.fc.bias.fill_(float("nan"))
    x, y = digits.flat(digits.x_train[:40]), digits.y_train[:40]
    res = evaluate(
        model, forget=(x[:10], y[:10]), eval=(x[10:25], y[10:25]), member_probe=(x[25:], y[25:])
    )
    assert "mia_error" in res and "mia_efficacy" not in res


def test_flags_restored_and_labels_checked(trained_cnn, digits) -> None:
    trained_cnn.train()
    try:
        evaluate(
            trained_cnn,
            forget=(digits.x_train[:8], digits.y_train[:8]),
            eval=(digits.x_test[:8], digits.y_test[:8]),
        )
        assert trained_cnn.training
    finally:
        trained_cnn.eval()
    with pytest.raises(ValueError, match="labels"):
        evaluate(
            trained_cnn,
            forget=(digits.x_train[:8], digits.y_train[:7]),
            eval=(digits.x_test[:8], digits.y_test[:8]),
        )
