"""Model families for judging releases against retraining (bench/release_honesty.py and
tests/trust): real data that needs no download, each model trained by a recipe the service
can replay (worker.imu.recipe), so the reference for a request is that recipe without its
records.

- ``digits-mlp``, ``digits-cnn``: scikit-learn digits, shuffled, 1200 / 597; they generalise.
- ``breast-cancer-mlp``: scikit-learn's Wisconsin breast cancer, standardised, 400 / 169.
- ``fashion-mlp``: 3000 / 2000 Fashion-MNIST images (Debian's dataset-fashion-mnist); it
  memorises somewhat (train 0.93, held-out 0.86).
- ``flipped``: digits with 10 % of the training labels replaced, a 64-256-10 MLP for 300
  epochs: train accuracy 1.00, it fits the wrong labels.
- ``digits-shifted-mlp``: each digit moved by up to one pixel each way (9 copies; the
  originals split 1400 / 397 before shifting, so no shifted copy of an eval digit trains):
  12600 / 3573, the 64-64-10 MLP; enough records for bursts of thousands of requests.
- ``noisy``: 400 digits with Gaussian pixel noise (sd 0.25), the same MLP for 400 epochs:
  train accuracy 1.00, it fits the noise.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from worker.imu.architectures import build
from worker.imu.checkpoints import load_state_dict, to_bytes
from worker.imu.membership import Evidence, MembershipTest
from worker.imu.recipe import Recipe, retrain
from worker.imu.train import accuracy

MLP_256 = {"in_features": 64, "hidden": [256], "num_classes": 10}
MEMORISING = ("flipped", "noisy", "fashion-mlp")
PROBE = 100  # the last training rows: the member probe, never named by a request


@dataclass
class Family:
    name: str
    architecture: str
    arch_kwargs: dict[str, Any]
    recipe: Recipe
    x: torch.Tensor  # training inputs as the model takes them
    y: torch.Tensor  # training labels (flipped ones included)
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    flipped: list[int] = field(default_factory=list)  # rows whose label was replaced
    model: torch.nn.Module | None = None
    seconds_to_train: float = 0.0
    _refs: dict[tuple[int, ...], torch.nn.Module] = field(default_factory=dict)

    @cached_property  # callers index it per record: built once, not 7,000 strings a lookup
    def ids(self) -> list[str]:
        return [f"{self.name[:2]}{i:05d}" for i in range(len(self.y))]

    @property
    def n_classes(self) -> int:
        return int(torch.unique(self.y).numel())

    def train(self, rows: list[int] | None = None) -> torch.nn.Module:
        """The recipe on every training row, or on all but ``rows`` (cached per set)."""
        key = tuple(sorted(rows or []))
        if key not in self._refs:
            keep = np.setdiff1d(np.arange(len(self.y)), np.array(key, dtype=np.int64))
            model, _ = retrain(
                self.architecture,
                self.arch_kwargs,
                self.x[keep],
                self.y[keep],
                self.recipe,
                device="cpu",
            )
            self._refs[key] = model.eval()
        return self._refs[key]

    def retrained(self, rows: list[int]) -> torch.nn.Module:
        return self.train(rows)

    def evidence(self, model: torch.nn.Module, rows: list[int], class_wise: bool) -> Evidence:
        """The membership test as the service runs it: members are the retained rows,
        non-members the whole eval set."""
        keep = np.setdiff1d(np.arange(len(self.y)), np.array(rows))
        test = MembershipTest(
            (self.x[rows], self.y[rows]),
            (self.x[keep], self.y[keep]),
            (self.x_eval, self.y_eval),
            class_wise=class_wise,
        )
        model.eval()
        return test.assess(lambda inputs: model(inputs).detach())

    def forget_acc(self, model: torch.nn.Module, rows: list[int]) -> float:
        return accuracy(model.eval(), self.x[rows], self.y[rows])

    def heldout_acc(self, model: torch.nn.Module, skip_class: int | None = None) -> float:
        keep = self.y_eval != skip_class if skip_class is not None else slice(None)
        return accuracy(model.eval(), self.x_eval[keep], self.y_eval[keep])

    # What the service is given ----------------------------------------------------------
    def npz(self, rows: slice | list[int] | None, split: str = "train") -> bytes:
        x, y = (self.x, self.y) if split == "train" else (self.x_eval, self.y_eval)
        ids = self.ids if split == "train" else [f"v{i:05d}" for i in range(len(y))]
        pick = np.arange(len(y))[rows] if rows is not None else np.arange(len(y))
        buf = io.BytesIO()
        np.savez(buf, ids=np.array(ids)[pick], inputs=x[pick].numpy(), labels=y[pick].numpy())
        return buf.getvalue()

    def trained(self) -> Any:
        """As tests.worker.harness.Trained: what Stack.register uploads."""
        from tests.worker.harness import Trained

        model = self.model if self.model is not None else self.train()
        probe = list(range(len(self.y) - PROBE, len(self.y)))
        return Trained(
            train_npz=self.npz(None),
            eval_npz=self.npz(None, "eval"),
            probe_npz=self.npz(probe),
            train_ids=self.ids,
            weights={"model": to_bytes(model)},
            specs={"model": (self.architecture, self.arch_kwargs)},
        )

    def recipe_json(self) -> dict[str, Any]:
        """The registration's recipe, without datasets (Stack.register adds the train set)."""
        return {k: v for k, v in self.recipe.to_dict().items() if k != "datasets"}

    def load(self, weights: bytes) -> torch.nn.Module:
        model = build(self.architecture, **self.arch_kwargs)
        model.load_state_dict(load_state_dict(weights))
        return model.eval()


def _digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    x = (digits.data[order] / 16.0).astype(np.float32)
    return x, digits.target[order].astype(np.int64), rng


def _make(name: str, arch: str, kwargs: dict, recipe: Recipe, x, y, xe, ye, **extra: Any) -> Family:
    fam = Family(
        name,
        arch,
        kwargs,
        recipe,
        torch.as_tensor(x),
        torch.as_tensor(y),
        torch.as_tensor(xe),
        torch.as_tensor(ye),
        **extra,
    )
    import time

    t0 = time.perf_counter()
    fam.model = fam.train()
    fam.seconds_to_train = time.perf_counter() - t0
    return fam


def family(name: str) -> Family:
    if name in ("digits-mlp", "digits-cnn"):
        x, y, _ = _digits()
        if name == "digits-cnn":
            kwargs = {"in_channels": 1, "num_classes": 10, "width": 8}
            xi = x.reshape(-1, 1, 8, 8)
            return _make(
                name,
                "cnn",
                kwargs,
                Recipe(epochs=25, lr=3e-3),
                xi[:1200],
                y[:1200],
                xi[1200:],
                y[1200:],
            )
        kwargs = {"in_features": 64, "hidden": [64], "num_classes": 10}
        return _make(
            name, "mlp", kwargs, Recipe(epochs=30, lr=3e-3), x[:1200], y[:1200], x[1200:], y[1200:]
        )
    if name == "digits-shifted-mlp":
        x, y, _ = _digits()
        images = x.reshape(-1, 8, 8)

        def shifted(rows: slice) -> tuple[np.ndarray, np.ndarray]:
            base = images[rows]
            moves = [np.roll(base, (dy, dx), (1, 2)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            return np.concatenate(moves).reshape(-1, 64), np.tile(y[rows], len(moves))

        x_tr, y_tr = shifted(slice(0, 1400))
        x_ev, y_ev = shifted(slice(1400, None))
        kwargs = {"in_features": 64, "hidden": [64], "num_classes": 10}
        return _make(name, "mlp", kwargs, Recipe(epochs=15, lr=3e-3), x_tr, y_tr, x_ev, y_ev)
    if name == "breast-cancer-mlp":
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        order = np.random.default_rng(0).permutation(len(data.target))
        x, y = data.data[order].astype(np.float32), data.target[order].astype(np.int64)
        mean, std = x[:400].mean(0), x[:400].std(0) + 1e-6
        x = ((x - mean) / std).astype(np.float32)
        kwargs = {"in_features": 30, "hidden": [32], "num_classes": 2}
        return _make(
            name,
            "mlp",
            kwargs,
            Recipe(epochs=60, lr=1e-3, batch_size=32),
            x[:400],
            y[:400],
            x[400:],
            y[400:],
        )
    if name == "fashion-mlp":
        from bench.data import find_fashion_mnist, load_fashion_mnist

        folder = find_fashion_mnist()
        if folder is None:
            raise FileNotFoundError("Fashion-MNIST: apt-get install dataset-fashion-mnist")
        data = load_fashion_mnist(folder, n_train=5000, n_test=10, seed=0)
        perm = torch.randperm(5000, generator=torch.Generator().manual_seed(0))
        x, y = data.x_train.reshape(5000, -1), data.y_train
        tr, ev = perm[:3000], perm[3000:]
        kwargs = {"in_features": 784, "hidden": [256], "num_classes": 10}
        return _make(name, "mlp", kwargs, Recipe(epochs=10, lr=1e-3), x[tr], y[tr], x[ev], y[ev])
    if name in ("flipped", "noisy"):
        x, y, rng = _digits()
        n = 1200 if name == "flipped" else 400
        x_tr, y_tr, x_ev, y_ev = x[:n].copy(), y[:n].copy(), x[1200:], y[1200:]
        flipped: list[int] = []
        if name == "noisy":
            x_tr = (x_tr + rng.normal(0, 0.25, x_tr.shape)).astype(np.float32)
            x_ev = (x_ev + rng.normal(0, 0.25, x_ev.shape)).astype(np.float32)
        else:
            flipped = sorted(rng.choice(n, n // 10, replace=False).tolist())
            y_tr[flipped] = (y_tr[flipped] + rng.integers(1, 10, len(flipped))) % 10
        epochs = 300 if name == "flipped" else 400
        return _make(
            name,
            "mlp",
            MLP_256,
            Recipe(epochs=epochs, lr=3e-3),
            x_tr,
            y_tr,
            x_ev,
            y_ev,
            flipped=flipped,
        )
    raise KeyError(name)


def request_rows(fam: Family, kind: str, seed: int = 0) -> tuple[list[int], bool]:
    """(rows, class_wise) of a request kind: `mislabelled3`, `randomN` (N records), `class`
    (every training record of one class); the member probe is never named."""
    rng = np.random.default_rng(seed)
    n = len(fam.y) - PROBE
    if kind == "mislabelled3":
        pool = [i for i in fam.flipped if i < n]
        return sorted(rng.choice(pool, 3, replace=False).tolist()), False
    if kind.startswith("random"):
        size = int(kind.removeprefix("random"))
        return sorted(rng.choice(n, size, replace=False).tolist()), False
    if kind == "class":
        c = int(rng.integers(0, fam.n_classes))
        return [i for i in range(len(fam.y)) if int(fam.y[i]) == c], True
    raise ValueError(kind)


__all__ = ["MEMORISING", "Family", "family", "request_rows"]
