"""Models trained to memorise (train accuracy 1.00), their retrained references, and the
membership test a user would run on a downloaded checkpoint (tests and bench/release_honesty.py).

Two families on scikit-learn's digits, shuffled and split 1200 / 597:
- ``flipped``: 10 % of the training labels replaced by another class, an MLP (64-256-10)
  trained for 300 epochs: it fits the wrong labels too;
- ``noisy``: 400 training images with Gaussian pixel noise (sd 0.25), the same MLP for 400
  epochs: it fits the noise.
The reference for a request is the same recipe and seed retrained without its records.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tests.worker.harness import Trained, npz
from worker.imu.architectures import build
from worker.imu.checkpoints import load_state_dict, to_bytes
from worker.imu.membership import Evidence, MembershipTest
from worker.imu.train import accuracy, fit

SPEC = {"in_features": 64, "hidden": [256], "num_classes": 10}
FAMILIES: dict[str, dict[str, Any]] = {
    "flipped": {"n_train": 1200, "flip": 0.1, "noise": 0.0, "epochs": 300},
    "noisy": {"n_train": 400, "flip": 0.0, "noise": 0.25, "epochs": 400},
}


@dataclass
class Family:
    name: str
    x: torch.Tensor  # training inputs (what the model was fitted on)
    y: torch.Tensor  # training labels (flipped ones included)
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    flipped: list[int]  # rows whose label was replaced
    epochs: int
    trained: Trained
    model: torch.nn.Module
    _refs: dict[tuple[int, ...], torch.nn.Module] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return self.trained.train_ids

    def rows_of(self, keys: list[str]) -> list[int]:
        index = {k: i for i, k in enumerate(self.ids)}
        return [index[k] for k in keys]

    def retrained(self, rows: list[int]) -> torch.nn.Module:
        """The model the recipe gives without these rows (cached per set)."""
        key = tuple(sorted(rows))
        if key not in self._refs:
            keep = np.setdiff1d(np.arange(len(self.y)), np.array(key))
            self._refs[key] = _fit(self.x[keep], self.y[keep], self.epochs)
        return self._refs[key]

    def evidence(self, model: torch.nn.Module, rows: list[int], class_wise: bool) -> Evidence:
        """The membership test as the service runs it: members are the retained rows,
        non-members the whole eval set."""
        keep = np.setdiff1d(np.arange(len(self.y)), np.array(rows))
        test = MembershipTest(
            (self.x[rows], self.y[rows]), (self.x[keep], self.y[keep]),
            (self.x_eval, self.y_eval), class_wise=class_wise,
        )  # fmt: skip
        model.eval()
        return test.assess(lambda inputs: model(inputs).detach())

    def forget_acc(self, model: torch.nn.Module, rows: list[int]) -> float:
        return accuracy(model.eval(), self.x[rows], self.y[rows])

    def heldout_acc(self, model: torch.nn.Module, skip_class: int | None = None) -> float:
        keep = self.y_eval != skip_class if skip_class is not None else slice(None)
        return accuracy(model.eval(), self.x_eval[keep], self.y_eval[keep])


def _fit(x: torch.Tensor, y: torch.Tensor, epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build("mlp", **SPEC)
    fit(model, x, y, epochs=epochs, lr=3e-3, seed=0, device="cpu")
    return model.eval()


def load_checkpoint(weights: bytes) -> torch.nn.Module:
    model = build("mlp", **SPEC)
    model.load_state_dict(load_state_dict(weights))
    return model.eval()


def family(name: str) -> Family:
    from sklearn.datasets import load_digits

    cfg = FAMILIES[name]
    digits = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits.target))
    x = (digits.data[order] / 16.0).astype(np.float32)
    y = digits.target[order].astype(np.int64)
    n = int(cfg["n_train"])
    x_tr, y_tr = x[:n].copy(), y[:n].copy()
    x_ev, y_ev = x[1200:], y[1200:]
    if cfg["noise"]:
        x_tr = (x_tr + rng.normal(0, cfg["noise"], x_tr.shape)).astype(np.float32)
        x_ev = (x_ev + rng.normal(0, cfg["noise"], x_ev.shape)).astype(np.float32)
    flipped: list[int] = []
    if cfg["flip"]:
        flipped = sorted(rng.choice(n, int(cfg["flip"] * n), replace=False).tolist())
        y_tr[flipped] = (y_tr[flipped] + rng.integers(1, 10, len(flipped))) % 10
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    model = _fit(xt, yt, int(cfg["epochs"]))
    ids = [f"{name[0]}{i:04d}" for i in range(n)]
    probe = list(range(n - 100, n))  # retained members the requests below never name
    trained = Trained(
        train_npz=npz(ids, x_tr, y_tr),
        eval_npz=npz([f"v{i:04d}" for i in range(len(y_ev))], x_ev, y_ev),
        probe_npz=npz([ids[i] for i in probe], x_tr[probe], y_tr[probe]),
        train_ids=ids,
        weights={"mlp": to_bytes(model)},
        specs={"mlp": ("mlp", SPEC)},
    )
    return Family(
        name, xt, yt, torch.from_numpy(x_ev), torch.from_numpy(y_ev), flipped,
        int(cfg["epochs"]), trained, model,
    )  # fmt: skip


def request_rows(fam: Family, kind: str, seed: int = 0) -> tuple[list[int], bool]:
    """(rows, class_wise) of a request kind: `mislabelled3`, `random3`, `random30`,
    `class` (every training record of one class)."""
    rng = np.random.default_rng(seed)
    n = len(fam.y) - 100  # the member probe stays
    if kind == "mislabelled3":
        pool = [i for i in fam.flipped if i < n]
        return sorted(rng.choice(pool, 3, replace=False).tolist()), False
    if kind.startswith("random"):
        size = int(kind.removeprefix("random"))
        return sorted(rng.choice(n, size, replace=False).tolist()), False
    if kind == "class":
        c = int(rng.integers(0, 10))
        return [i for i in range(len(fam.y)) if int(fam.y[i]) == c], True
    raise ValueError(kind)


def eval_arrays(trained: Trained) -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(trained.eval_npz), allow_pickle=False) as f:
        return f["inputs"], f["labels"]
