"""Session fixtures for the engine tests: sklearn digits and small models trained on them.

Everything is float64 on the CPU so numerical comparisons are tight, and small so the
whole folder runs in well under three minutes on one core.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from worker.imu.architectures import build
from worker.imu.train import fit


@dataclass(frozen=True)
class Digits:
    x_train: torch.Tensor  # (n, 1, 8, 8) float64 in [0, 1]
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


@pytest.fixture(scope="session")
def digits() -> Digits:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float64).reshape(-1, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(0))
    train, test = perm[:1200], perm[1200:]
    return Digits(x[train], y[train], x[test], y[test])


def _trained(name: str, kwargs: dict, x: torch.Tensor, y: torch.Tensor, **fit_kw) -> nn.Module:
    torch.manual_seed(0)
    model = build(name, **kwargs).double()
    fit(model, x, y, seed=0, device="cpu", **fit_kw)
    return model.eval()


@pytest.fixture(scope="session")
def trained_cnn(digits: Digits) -> nn.Module:
    """BatchNorm CNN, ~99% test accuracy on digits. Tests must deepcopy before changing it."""
    return _trained(
        "cnn",
        {"width": 8, "batch_norm": True},
        digits.x_train,
        digits.y_train,
        epochs=20,
        lr=3e-3,
    )
