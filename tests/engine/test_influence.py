"""Influence parity: closed form and torch.func against a plain per-sample autograd loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from worker.imu import compute_influence, influence_scores
from worker.imu.architectures import build

TOL = 1e-6


def reference_scores(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str], damping: float = 0.01
) -> torch.Tensor:
    """ALGORITHM.md §2 the slow, obvious way: one backward per sample."""
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    theta = [params[n] for n in names]
    rows = []
    for i in range(y.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, theta)]))
    g = torch.stack(rows)
    fisher = (g * g).mean(0) + damping
    return -(g @ (g.mean(0) / fisher))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class VGGStyle(nn.Module):
    """A VGG-like net whose head is a Sequential called ``classifier`` (Linear last)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TemperatureHead(nn.Module):
    """The last Linear's output is divided by a temperature: it is NOT the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh())
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x)) / 2.0


def _warm_batchnorm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give BatchNorm non-trivial running statistics, so eval mode matters."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


MODELS = {
    "mlp": lambda: build("mlp", in_features=64, hidden=[24], num_classes=10),
    "cnn": lambda: build("cnn", in_channels=1, num_classes=10, width=4, batch_norm=True),
    "resnet": lambda: build("resnet18_cifar", num_classes=10, in_channels=1, width=4),
    "vgg_classifier": VGGStyle,
}


def _model_and_data(kind: str, digits) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    model = MODELS[kind]().double()
    x = digits.x_train[:40]
    if kind == "mlp":
        x = digits.flat(x)
    model = _warm_batchnorm(model, x * 1.5 + 0.1)
    return model, x, digits.y_train[:40]


@pytest.mark.parametrize("kind", list(MODELS))
def test_closed_form_and_func_match_per_sample_loop(kind: str, digits) -> None:
    model, x, y = _model_and_data(kind, digits)
    fast = compute_influence(model, x, y, batch_size=16)
    func = compute_influence(model, x, y, batch_size=16, method="func")
    assert fast.method == "closed_form"
    assert func.method == "func"
    assert fast.theta == func.theta
    expected_head = {"vgg_classifier": "classifier.4"}.get(kind, "fc")
    assert fast.theta == [f"{expected_head}.weight", f"{expected_head}.bias"]
    ref = reference_scores(model, x, y, fast.theta)
    assert rel_err(fast.scores, ref) <= TOL
    assert rel_err(func.scores, ref) <= TOL
    assert fast.scores.shape == (40,)


def test_prefix_theta_spanning_two_layers(digits) -> None:
    model, x, y = _model_and_data("resnet", digits)
    res = compute_influence(model, x, y, params=["layer4.1", "fc"], batch_size=16)
    assert res.method == "func"
    assert res.theta[0].startswith("layer4.1.") and res.theta[-2:] == ["fc.weight", "fc.bias"]
    assert len(res.theta) == 8  # conv1, bn1 (w, b), conv2, bn2 (w, b), fc (w, b)
    ref = reference_scores(model, x, y, res.theta)
    assert rel_err(res.scores, ref) <= TOL
    loop = compute_influence(model, x, y, params=["fc", "layer4.1"], method="loop")
    assert loop.theta == res.theta  # the model's order, not the order of the prefixes
    assert rel_err(loop.scores, ref) <= TOL


def test_non_logits_head_takes_the_generic_path(digits) -> None:
    torch.manual_seed(0)
    model = TemperatureHead().double()
    x, y = digits.flat(digits.x_train[:30]), digits.y_train[:30]
    res = compute_influence(model, x, y)
    assert res.method == "func"
    assert res.theta == ["fc.weight", "fc.bias"]
    assert any("not the logits" in note for note in res.notes)
    assert rel_err(res.scores, reference_scores(model, x, y, res.theta)) <= TOL
    with pytest.raises(ValueError, match="logits"):
        compute_influence(model, x, y, method="closed_form")


def test_model_is_left_unchanged(digits) -> None:
    model, x, y = _model_and_data("resnet", digits)
    model.train()
    model.layer1.eval()  # mixed flags must come back exactly
    model.conv1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: m.training for name, m in model.named_modules()}
    for method in ("closed_form", "func", "loop"):
        influence_scores(model, x, y, method=method)
    influence_scores(model, x, y, params=["layer4"], method="func")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {name: m.training for name, m in model.named_modules()}
    assert not model.conv1.weight.requires_grad and model.fc.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_scores_are_stable_across_chunk_sizes(digits) -> None:
    model, x, y = _model_and_data("cnn", digits)
    a = influence_scores(model, x, y, batch_size=7)
    b = influence_scores(model, x, y, batch_size=512)
    assert rel_err(a, b) <= 1e-12


def test_float32_inputs_are_cast_to_the_model_dtype(digits) -> None:
    model, x, y = _model_and_data("mlp", digits)
    a = influence_scores(model, x.float(), y)
    b = influence_scores(model, x, y)
    assert a.dtype == torch.float64
    assert rel_err(a, b) <= 1e-6


def test_bad_arguments_are_named(digits) -> None:
    model, x, y = _model_and_data("mlp", digits)
    with pytest.raises(ValueError, match="no parameter matches the prefix 'nope'"):
        influence_scores(model, x, y, params=["nope"])
    with pytest.raises(ValueError, match="damping"):
        influence_scores(model, x, y, damping=0.0)
    with pytest.raises(ValueError, match="labels"):
        influence_scores(model, x, y[:-1])
    with pytest.raises(ValueError, match="method"):
        influence_scores(model, x, y, method="magic")


def test_progress_is_reported_during_influence(digits) -> None:
    model, x, y = _model_and_data("cnn", digits)
    seen: list[tuple[str, float]] = []
    compute_influence(model, x, y, batch_size=8, progress=lambda p, f: seen.append((p, f)))
    assert seen and all(p == "influence" and 0.0 <= f <= 1.0 for p, f in seen)
    assert seen[-1][1] == 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["cnn", "resnet", "vgg_classifier"])
def test_cuda_parity(kind: str, digits) -> None:
    model, x, y = _model_and_data(kind, digits)
    ref = reference_scores(model, x, y, compute_influence(model, x, y).theta)
    gpu = copy.deepcopy(model).cuda()
    for method in ("closed_form", "func"):
        scores = influence_scores(gpu, x, y, method=method)
        assert scores.device.type == "cpu"
        assert rel_err(scores, ref) <= TOL
