"""Exact forgetting for classifiers: how a model was trained, and training it again
without the records (ALGORITHM.md §7).

A ``Recipe`` is what version 1's training was: the engine's trainer (``train.fit``: Adam
on cross-entropy), its settings, the seed of the initial weights and of the shuffling, and
which datasets it read. Retraining from a fresh initialisation on the retained records is
exact: the result is a model that never saw the forgotten records, which is what every
approximate method can only be measured against.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from worker.imu.architectures import build
from worker.imu.canonical import canonical_json
from worker.imu.train import fit

TRAINERS = ("adam",)


@dataclass(frozen=True)
class Recipe:
    """The training run that produced version 1 (``fit``'s settings).

    init_seed: ``torch.manual_seed`` before the architecture is built (the initial weights).
    seed: the trainer's shuffling and dropout seed. datasets: the train datasets read, in
    order (ids, resolved at registration).
    """

    epochs: int
    lr: float
    batch_size: int = 128
    weight_decay: float = 0.0
    seed: int = 0
    init_seed: int = 0
    optimizer: str = "adam"
    datasets: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.optimizer not in TRAINERS:
            raise ValueError(f"optimizer must be one of {list(TRAINERS)}, got {self.optimizer!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["datasets"] = list(self.datasets)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        values = dict(data)
        values["datasets"] = tuple(values.get("datasets") or ())
        return cls(**values)

    def sha256(self) -> str:
        """The recipe's identity, as receipts cite it: sha256 of its canonical JSON."""
        return hashlib.sha256(canonical_json(self.to_dict()).encode()).hexdigest()


def retrain(
    architecture: str,
    arch_kwargs: dict[str, Any],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    *,
    device: str | torch.device | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh model of ``architecture`` trained by ``recipe`` on (inputs, labels): the
    model and JSON stats (epochs, the loss per epoch, n)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.init_seed)
        model = build(architecture, **arch_kwargs)
    losses = fit(
        model,
        inputs,
        labels,
        epochs=recipe.epochs,
        lr=recipe.lr,
        batch_size=recipe.batch_size,
        seed=recipe.seed,
        device=device,
        weight_decay=recipe.weight_decay,
        on_epoch=on_epoch,
    )
    stats = {
        "method": "retrain",
        "n_train": int(labels.shape[0]),
        "epochs": recipe.epochs,
        "loss_per_epoch": [round(v, 6) for v in losses],
        "recipe": recipe.to_dict(),
        "recipe_sha256": recipe.sha256(),
    }
    return model, stats


__all__ = ["TRAINERS", "Recipe", "retrain"]
