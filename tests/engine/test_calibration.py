"""Calibrated IMU and GA (the default): targets, guard, target-at-start, scale invariance,
determinism, θ prefixes and both backbone modes, on digits models trained here.

The digits test split is cut in two: a guard half the controller sees and a policy half it
never sees; utility is judged on the policy half, as the release policy does.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from worker.imu import GAConfig, IMUConfig, gradient_ascent, unlearn
from worker.imu._util import epoch_batches
from worker.imu.architectures import build
from worker.imu.checks import loss_auc
from worker.imu.train import accuracy, fit

FORGET_CLASS = 3


def _halves(digits) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(digits.y_test.shape[0], generator=torch.Generator().manual_seed(5))
    g, p = order[::2], order[1::2]
    return (digits.x_test[g], digits.y_test[g]), (digits.x_test[p], digits.y_test[p])


def _forget_class(digits, flat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training record of FORGET_CLASS (flattened for the MLP)."""
    mask = digits.y_train == FORGET_CLASS
    x = digits.x_train[mask]
    return (digits.flat(x) if flat else x), digits.y_train[mask]


def _others(model: nn.Module, pair) -> float:
    x, y = pair
    keep = y != FORGET_CLASS
    return accuracy(model, x[keep], y[keep])


@pytest.fixture(scope="module")
def trained_mlp(digits) -> nn.Module:
    torch.manual_seed(1)
    model = build("mlp", in_features=64, hidden=[64]).double()
    fit(
        model, digits.flat(digits.x_train), digits.y_train, epochs=30, lr=3e-3, seed=1, device="cpu"
    )
    return model.eval()


def test_epoch_batches_use_every_sample_exactly_once() -> None:
    for n, size in ((10, 3), (4, 3), (7, 7), (1, 5), (13, 4)):
        parts = epoch_batches(torch.arange(n), size, avoid_single=True)
        assert sorted(torch.cat(parts).tolist()) == list(range(n)), (n, size)
        assert all(p.numel() >= 2 for p in parts) or n == 1
    assert [p.tolist() for p in epoch_batches(torch.arange(10), 3, True)] == [
        [0, 1, 2],
        [3, 4, 5],
        [6, 7, 8, 9],
    ]
    assert [p.tolist() for p in epoch_batches(torch.arange(4), 3, True)] == [[0, 1, 2, 3]]


def test_fixed_schedule_trains_each_kept_sample_once_per_epoch_on_batchnorm(
    trained_cnn, digits
) -> None:
    """With a trailing batch of one (10 kept samples, batch 3), a BatchNorm CNN in train
    mode still sees each kept sample exactly once per epoch."""
    xf, yf = _forget_class(digits)
    model = copy.deepcopy(trained_cnn)
    seen: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple) -> None:
        if module.training and torch.is_grad_enabled():
            seen.append(args[0].detach().clone())

    handle = model.register_forward_pre_hook(record)
    cfg = IMUConfig(calibration="off", epochs=2, batch_size=3, top_data=1.0, device="cpu")
    n_candidates = None
    try:
        result = unlearn(model, xf, yf, cfg)
        n_candidates = result.stats["selection"]["kept"]
    finally:
        handle.remove()
    kept = result.stats["kept_indices"]
    assert n_candidates == len(kept) and len(kept) % 3 == 1  # the case that used to break
    batches = torch.cat(seen)
    assert batches.shape[0] == 2 * len(kept)
    per_epoch = [batches[: len(kept)], batches[len(kept) :]]
    for epoch in per_epoch:
        rows = {tuple(r.flatten().tolist()) for r in epoch}
        assert rows == {tuple(xf[i].flatten().tolist()) for i in kept}


def test_class_wise_default_request_forgets_and_keeps_utility_on_batchnorm_cnn(
    trained_cnn, digits
) -> None:
    guard, policy = _halves(digits)
    xf, yf = _forget_class(digits)
    model = copy.deepcopy(trained_cnn)
    before = _others(model, policy)
    result = unlearn(model, xf, yf, IMUConfig(device="cpu"), heldout=guard, class_wise=True)
    cal = result.stats["calibration"]
    assert cal["reason"] == "target-reached", cal
    assert accuracy(model, xf, yf) <= 0.05
    assert _others(model, policy) >= before - 0.03
    assert 0 < cal["steps"] <= 200 and cal["lr"] > 0 and cal["alpha"] > 0
    assert cal["trajectory"][0]["step"] == 0 and cal["trajectory"][-1]["forget_acc"] <= 0.05
    assert cal["check_every"] == 4  # BatchNorm backbone in train mode
    assert json.loads(json.dumps(result.stats)) == result.stats


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def test_calibrated_steps_leave_batchnorm_running_statistics_as_they_were(
    trained_cnn, digits
) -> None:
    """Train-mode steps on one class would pull the running statistics toward that class's
    (eval mode, the guard and the policy use them); calibrated runs keep every buffer, IMU
    and GA alike, and restore BatchNorm's momentum. With calibration off (the authors' loop)
    the statistics move as in training."""
    guard, _ = _halves(digits)
    xf, yf = _forget_class(digits)
    start = _buffers(trained_cnn)
    momenta = [m.momentum for m in trained_cnn.modules() if isinstance(m, nn.BatchNorm2d)]
    runs = [
        (IMUConfig(device="cpu"), unlearn, True),
        (GAConfig(device="cpu"), gradient_ascent, True),
        (IMUConfig(device="cpu", calibration="off", epochs=1), unlearn, False),
    ]
    for cfg, method, frozen in runs:
        model = copy.deepcopy(trained_cnn)
        method(model, xf, yf, cfg, heldout=guard, class_wise=True)
        after = _buffers(model)
        same = all(torch.equal(start[k], v) for k, v in after.items())
        assert same is frozen, (type(cfg).__name__, cfg.calibration)
        assert [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == momenta


@pytest.mark.parametrize(
    ("params", "mode"),
    [(None, "eval"), (["features.7", "fc"], "train"), (["features.7", "fc"], "eval")],
)
def test_calibration_with_theta_prefixes_and_both_backbone_modes(
    trained_cnn, digits, params, mode
) -> None:
    guard, policy = _halves(digits)
    xf, yf = _forget_class(digits)
    model = copy.deepcopy(trained_cnn)
    before = _others(model, policy)
    cfg = IMUConfig(params=params, backbone_mode=mode, device="cpu")
    result = unlearn(model, xf, yf, cfg, heldout=guard, class_wise=True)
    cal = result.stats["calibration"]
    assert cal["reason"] in ("target-reached", "guard-exhausted"), cal
    # Either the target was met within the guard, or the guard stopped it: never collapse.
    assert _others(model, policy) >= before - 0.04
    if cal["reason"] == "target-reached":
        assert accuracy(model, xf, yf) <= 0.05
    assert result.stats["cached_features"] is (params is None and mode == "eval")


def test_guard_backtracks_when_steps_are_too_long(trained_mlp, digits) -> None:
    guard, policy = _halves(digits)
    flat_guard = (digits.flat(guard[0]), guard[1])
    xf, yf = _forget_class(digits, flat=True)
    model = copy.deepcopy(trained_mlp)
    before = _others(model, (digits.flat(policy[0]), policy[1]))
    # 50x the default step length, on the cross-entropy (the margin term spares the other
    # classes by design, so it does not exercise the guard here).
    cfg = IMUConfig(device="cpu", step_scale=0.05, ascent_term="ce")
    result = unlearn(model, xf, yf, cfg, heldout=flat_guard, class_wise=True)
    cal = result.stats["calibration"]
    assert cal["backtracks"] >= 1, cal
    lrs = [t["lr"] for t in cal["trajectory"][1:]]
    assert min(lrs) < cal["lr"]  # each backtrack halves the step
    assert _others(model, (digits.flat(policy[0]), policy[1])) >= before - 0.05


def test_random_request_that_already_looks_unseen_returns_the_model_unchanged(
    trained_cnn, digits
) -> None:
    guard, policy = _halves(digits)
    # Records the model never trained on, posing as a request: as unseen as records get.
    x_f, y_f = policy[0][:60], policy[1][:60]
    model = copy.deepcopy(trained_cnn)
    before = copy.deepcopy(model.state_dict())
    result = unlearn(model, x_f, y_f, IMUConfig(device="cpu"), heldout=guard)
    cal = result.stats["calibration"]
    assert cal["reason"] == "target-at-start" and cal["steps"] == 0
    assert cal["start"]["auc"] <= cal["start"]["auc_limit"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_random_request_without_heldout_data_changes_nothing_and_says_why(
    trained_cnn, digits
) -> None:
    model = copy.deepcopy(trained_cnn)
    before = copy.deepcopy(model.state_dict())
    result = unlearn(model, digits.x_train[:40], digits.y_train[:40], IMUConfig(device="cpu"))
    assert result.stats["calibration"]["reason"] == "no-heldout-data"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_memorised_random_records_are_driven_to_look_unseen(digits) -> None:
    """A model that memorised its records (tiny training set, many epochs): the forget set's
    loss AUC starts far above the limit and the controller brings it within it."""
    torch.manual_seed(0)
    model = build("mlp", in_features=64, hidden=[128]).double()
    x, y = digits.flat(digits.x_train[:200]), digits.y_train[:200]
    fit(model, x, y, epochs=150, lr=3e-3, seed=0, device="cpu")
    guard, policy = _halves(digits)
    heldout = (digits.flat(guard[0]), guard[1])
    xf, yf = x[:40], y[:40]
    result = unlearn(model, xf, yf, IMUConfig(device="cpu"), heldout=heldout)
    cal = result.stats["calibration"]
    assert cal["start"]["auc"] > cal["start"]["auc_limit"], cal["start"]
    assert cal["reason"] in ("target-reached", "guard-exhausted"), cal
    if cal["reason"] == "target-reached":
        assert cal["final"]["auc"] <= cal["final"]["auc_limit"]
    assert cal["final"]["auc"] < cal["start"]["auc"]


def test_the_working_step_follows_the_model_scale(trained_mlp, digits) -> None:
    """Rescaling the hidden layer by k and the head by 1/k leaves the outputs unchanged;
    the calibrated run forgets the same way at every k (a fixed lr would not)."""
    guard, policy = _halves(digits)
    heldout = (digits.flat(guard[0]), guard[1])
    xf, yf = _forget_class(digits, flat=True)
    policy_flat = (digits.flat(policy[0]), policy[1])
    before = _others(trained_mlp, policy_flat)
    outcomes, fixed_runs = {}, {}
    for k in (0.1, 1.0, 10.0):
        model = copy.deepcopy(trained_mlp)
        with torch.no_grad():
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            first, head = linears[0], linears[-1]
            first.weight.mul_(k)
            first.bias.mul_(k)
            head.weight.div_(k)
        assert torch.allclose(model(xf), trained_mlp(xf), atol=1e-9)
        fixed = copy.deepcopy(model)
        result = unlearn(model, xf, yf, IMUConfig(device="cpu"), heldout=heldout, class_wise=True)
        cal = result.stats["calibration"]
        unlearn(fixed, xf, yf, IMUConfig(device="cpu", calibration="off"))
        outcomes[k] = (cal["steps"], accuracy(model, xf, yf), _others(model, policy_flat))
        fixed_runs[k] = (accuracy(fixed, xf, yf), _others(fixed, policy_flat))
    for _steps, forget_acc, others in outcomes.values():
        assert forget_acc <= 0.1 and others >= before - 0.04, outcomes
    steps = [v[0] for v in outcomes.values()]
    assert max(steps) <= 2 * min(steps), outcomes
    # The authors' fixed lr forgets nothing at one scale or damages the model at another.
    assert fixed_runs[0.1][0] > 0.5 or fixed_runs[10.0][1] < before - 0.04, fixed_runs


def test_calibration_is_deterministic_for_a_seed(trained_cnn, digits) -> None:
    guard, _ = _halves(digits)
    xf, yf = _forget_class(digits)
    runs = []
    for seed in (4, 4):
        model = copy.deepcopy(trained_cnn)
        unlearn(model, xf, yf, IMUConfig(device="cpu", seed=seed), heldout=guard, class_wise=True)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_calibrated_ga_uses_the_same_controller(trained_mlp, digits) -> None:
    guard, policy = _halves(digits)
    heldout = (digits.flat(guard[0]), guard[1])
    xf, yf = _forget_class(digits, flat=True)
    model = copy.deepcopy(trained_mlp)
    before = _others(model, (digits.flat(policy[0]), policy[1]))
    result = gradient_ascent(
        model, xf, yf, GAConfig(device="cpu"), heldout=heldout, class_wise=True
    )
    cal = result.stats["calibration"]
    assert cal["mode"] == "auto" and cal["alpha"] == 0.0 and cal["steps"] > 0
    assert cal["reason"] in ("target-reached", "guard-exhausted")
    assert _others(model, (digits.flat(policy[0]), policy[1])) >= before - 0.05
    assert result.stats["params"] == "all"


def test_ga_defaults_are_the_authors_settings() -> None:
    cfg = GAConfig(calibration="off")
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.epochs) == (0.01, 0.9, 5e-4, 10)
    assert cfg.train_mode is True and cfg.params is None
    with pytest.raises(ValueError, match="lr is chosen by the calibration"):
        GAConfig.from_overrides({"lr": 0.1})
    assert GAConfig.from_overrides({"lr": 0.1, "calibration": "off"}).lr == 0.1
    with pytest.raises(ValueError, match="train_mode"):
        GAConfig(train_mode="yes")  # type: ignore[arg-type]


def test_loss_auc_matches_the_definition() -> None:
    auc, limit = loss_auc(torch.tensor([0.1, 0.2]), torch.tensor([0.15, 0.3, 0.2]))
    # Pairs (forget, held-out) where the held-out loss is higher; ties count half.
    assert auc == pytest.approx((3 + 1.5) / 6)
    assert limit == pytest.approx(0.5 + 2 * ((2 + 3 + 1) / (12 * 2 * 3)) ** 0.5)
    same = torch.linspace(0, 1, 101)
    assert loss_auc(same, same)[0] == pytest.approx(0.5)


def test_class_wise_margin_steps_keep_the_ranking_of_the_remaining_classes(
    trained_mlp, digits
) -> None:
    """With θ the linear head (cached features) the margin term raises every other logit by
    the same amount: no held-out record changes its prediction from one remaining class to
    another; only predictions of the forgotten class move."""
    guard, policy = _halves(digits)
    flat = (digits.flat(policy[0]), policy[1])
    xf, yf = _forget_class(digits, flat=True)
    model = copy.deepcopy(trained_mlp)
    with torch.no_grad():
        before = model(flat[0]).argmax(1)
    cfg = IMUConfig(device="cpu", backbone_mode="eval", l1_scale=0.0)
    result = unlearn(model, xf, yf, cfg, heldout=(digits.flat(guard[0]), guard[1]), class_wise=True)
    assert result.stats["ascent_term"] == "margin" and result.stats["cached_features"]
    assert result.stats["calibration"]["reason"] == "target-reached"
    with torch.no_grad():
        after = model(flat[0]).argmax(1)
    forgotten = int(yf[0])
    kept = (before != forgotten) & (after != forgotten)
    assert kept.sum() > 0.8 * len(before)
    assert torch.equal(before[kept], after[kept])
    assert accuracy(model, xf, yf) <= 0.05
    # Off, or asked for explicitly, the cross-entropy stays the term (the authors' loss).
    assert IMUConfig(calibration="off").term_for(class_wise=True) == "ce"
    assert IMUConfig(ascent_term="ce").term_for(class_wise=True) == "ce"
    assert IMUConfig().term_for(class_wise=False) == "ce"


def test_the_auc_limit_is_the_policys_for_the_whole_forget_set(trained_mlp, digits) -> None:
    """A check scores at most CHECK_FORGET_MAX forget records, but the policy tests every one:
    the controller's limit must be the policy's (narrower) one, or it stops where the policy
    then holds the result."""
    from worker.imu.checks import CHECK_FORGET_MAX, auc_limit, build_checks

    guard, _ = _halves(digits)
    heldout = (digits.flat(guard[0]), guard[1])
    n = CHECK_FORGET_MAX + 400
    xf, yf = digits.flat(digits.x_train[:n]), digits.y_train[:n]
    checks = build_checks(
        trained_mlp, (xf, yf), heldout, class_wise=False, forget_acc_target=0.05, seed=0
    )
    m = checks.measure()
    n_e = int(heldout[1].shape[0])
    assert m.auc_limit == pytest.approx(auc_limit(n, n_e))
    assert m.auc_limit < auc_limit(CHECK_FORGET_MAX, n_e)  # the scored subset's, looser
    # The AUC itself is the subset's estimate: the same as scoring those records directly.
    assert m.auc is not None and 0.0 <= m.auc <= 1.0


def test_the_guard_keeps_a_margin_for_random_requests(trained_mlp, digits) -> None:
    """Left unset, the guard is 0.03 for class-wise requests and 0.02 for the others (which
    end at its edge); a value the request names is used as given, and stats record it."""
    cfg = IMUConfig(device="cpu")
    assert cfg.guard_max_drop is None
    assert (cfg.guard_drop_for(True), cfg.guard_drop_for(False)) == (0.03, 0.02)
    assert IMUConfig.from_overrides({"guard_max_drop": 0.05}).guard_drop_for(False) == 0.05
    with pytest.raises(ValueError, match="guard_max_drop"):
        IMUConfig(guard_max_drop=-0.1)
    guard, _ = _halves(digits)
    heldout = (digits.flat(guard[0]), guard[1])
    xf, yf = _forget_class(digits, flat=True)
    for class_wise, expected in ((True, 0.03), (False, 0.02)):
        result = unlearn(
            copy.deepcopy(trained_mlp), xf, yf, cfg, heldout=heldout, class_wise=class_wise
        )
        assert result.stats["calibration"]["guard_max_drop"] == expected


def test_a_step_is_bounded_when_the_gradient_wakes_up() -> None:
    """The lr is sized on θ₀'s gradient; on memorised records that one is near zero, so a
    later, larger gradient must not make a step longer than the first one planned."""
    from worker.imu.calibration import AscentProblem, _step

    p = torch.nn.Parameter(torch.zeros(10))
    model = torch.nn.Module()
    model.p = p
    problem = AscentProblem(
        model, [p], 1, lambda idx: 1000.0 * p.sum(), batch_size=1, train_mode=False
    )
    opt = torch.optim.SGD([p], lr=1.0)
    _step(opt, problem, torch.arange(1), 0.0, max_grad_norm=0.5)
    assert float(p.detach().norm()) == pytest.approx(0.5, rel=1e-5)  # unclipped: 3162
