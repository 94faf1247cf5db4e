"""Plain supervised training and accuracy helpers (the demo, benches and tests reuse them)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from worker.imu._util import (
    as_inputs,
    as_labels,
    check_pair,
    epoch_batches,
    model_device,
    model_dtype,
    rng_devices,
)
from worker.imu._util import preserved_modes as _modes
from worker.imu.config import resolve_device


def fit(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
    weight_decay: float = 0.0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train with Adam on cross-entropy; returns the mean training loss per epoch.

    ``on_epoch(epochs done, mean loss)`` is called after every epoch; an exception it raises
    propagates (that is how a worker cancels a retrain mid-run).

    Deterministic for a given seed on one device: shuffling uses its own generator and
    dropout draws from a forked, seeded RNG (the global RNG state is left untouched). The
    model is moved to ``device`` (None/"auto": CUDA when available) and left in eval mode.
    """
    inputs, labels = torch.as_tensor(inputs), as_labels(labels)
    n = check_pair(inputs, labels)
    if n == 0:
        raise ValueError("no training data")
    dev = resolve_device(device)
    model.to(dev)
    dtype = model_dtype(model)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    with torch.random.fork_rng(devices=rng_devices(dev)):
        torch.manual_seed(seed)
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for idx in epoch_batches(order, batch_size, avoid_single=True):
                x = as_inputs(inputs[idx], dev, dtype)
                loss = F.cross_entropy(model(x), labels[idx].to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.numel()
            losses.append(total / n)
            if on_epoch is not None:
                on_epoch(epoch + 1, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def predictions(
    model: nn.Module,
    inputs: torch.Tensor,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Predicted classes (CPU int64) in eval mode; flags restored. ``device`` moves the
    model there first (None keeps it where it is)."""
    inputs = torch.as_tensor(inputs)
    if device is not None:
        model.to(resolve_device(device))
    dev, dtype = model_device(model), model_dtype(model)
    out = []
    with _modes(model, train=False):
        for start in range(0, inputs.shape[0], batch_size):
            logits = model(as_inputs(inputs[start : start + batch_size], dev, dtype))
            out.append(logits.argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def accuracy(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> float:
    """Share of correct predictions (nan for an empty set)."""
    labels = as_labels(labels)
    check_pair(inputs, labels)
    if labels.numel() == 0:
        return float("nan")
    pred = predictions(model, inputs, batch_size, device)
    return float((pred == labels).double().mean())


def predict_per_class_accuracy(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    batch_size: int = 512,
) -> list[float | None]:
    """Accuracy of each class 0..num_classes-1 (None where the class has no sample)."""
    labels = as_labels(labels)
    check_pair(inputs, labels)
    pred = predictions(model, inputs, batch_size)
    out: list[float | None] = []
    for c in range(num_classes):
        mask = labels == c
        out.append(float((pred[mask] == c).double().mean()) if mask.any() else None)
    return out
