"""IMU unlearning (DESIGN §4, all steps) and the gradient-ascent baseline.

Both functions update the model in place and return it in an ``UnlearnResult`` whose
``stats`` is plain JSON (it is stored with the job). ``progress(phase, fraction)`` is called
with phase "influence" and "unlearning" (at least once per epoch); an exception raised by
it propagates unchanged — that is how the worker cancels. On any exception the parameters
keep the optimizer steps already taken (the caller discards the model), while the
train/eval flags and ``requires_grad`` flags are always restored.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.imu._util import (
    Progress,
    as_inputs,
    as_labels,
    check_pair,
    find_head,
    model_dtype,
    only_these_require_grad,
    preserved_modes,
    resolve_theta,
    rng_devices,
)
from worker.imu.config import IMUConfig, resolve_device
from worker.imu.influence import compute_influence
from worker.imu.selection import select_and_weight


@dataclass
class UnlearnResult:
    model: nn.Module  # the module passed in, updated in place
    stats: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable


def _batches(order: torch.Tensor, batch_size: int, avoid_single: bool) -> list[torch.Tensor]:
    """Mini-batches of ``order``; with ``avoid_single`` a trailing batch of one sample joins
    the previous one (train-mode BatchNorm cannot normalise a single vector)."""
    parts = list(torch.split(order, batch_size))
    if avoid_single and len(parts) > 1 and parts[-1].numel() == 1:
        parts[-2] = torch.cat([parts[-2], parts.pop()])
    return parts


def _l1(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum(p.abs().sum() for p in params)


def _call(progress: Progress | None, phase: str, fraction: float) -> None:
    if progress is not None:
        progress(phase, float(fraction))


def unlearn(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    config: IMUConfig | None = None,
    progress: Progress | None = None,
) -> UnlearnResult:
    """Run IMU on the forget set (inputs, labels); update θ of ``model`` in place.

    ``stats`` holds the selection info (n, candidates, kept, clip value, weight quantiles,
    fallback), ``kept_indices`` (into the forget set, most influential first), the loss per
    epoch, seconds per phase, the influence path, θ names and the device.
    """
    cfg = config if config is not None else IMUConfig()
    cfg.validate()
    inputs = torch.as_tensor(inputs)
    n = check_pair(inputs, labels, "forget set")
    if n == 0:
        raise ValueError("the forget set is empty")
    labels = as_labels(labels)
    device = resolve_device(cfg.device)
    model.to(device)
    dtype = model_dtype(model)
    t_start = time.perf_counter()

    # Steps 1-4. In eval mode with a final-Linear θ the head inputs are cached here.
    _call(progress, "influence", 0.0)
    infl = compute_influence(
        model, inputs, labels, params=cfg.params, damping=cfg.damping,
        batch_size=cfg.influence_batch_size, keep_features=cfg.backbone_mode == "eval",
        progress=progress,
    )  # fmt: skip
    _call(progress, "influence", 1.0)
    t_influence = time.perf_counter()

    # Steps 5-6.
    kept, weights, info = select_and_weight(infl.scores, cfg.top_data, cfg.clip_quantile)
    t_selection = time.perf_counter()

    # Step 7.
    head = find_head(model, as_inputs(inputs[: min(n, 4)], device, dtype))
    theta = resolve_theta(model, cfg.params, head)
    theta_names = [name for name, _ in theta]
    theta_params = [p for _, p in theta]
    features = infl.features[kept.to(device)] if infl.features is not None else None
    infl.features = None  # only the kept rows are needed from here on
    use_cached = features is not None and cfg.backbone_mode == "eval"
    w_all = weights.to(device=device, dtype=dtype)
    y_all = labels[kept].to(device)
    x_kept = None if use_cached else inputs[kept]
    head_w = head_b = None
    if use_cached:
        prefix = head.name + "." if head.name else ""
        head_w, head_b = head.module.weight, head.module.bias
        assert {prefix + "weight", prefix + "bias"} >= set(theta_names)

    generator = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    _call(progress, "unlearning", 0.0)
    with (
        preserved_modes(model, train=cfg.backbone_mode == "train"),
        only_these_require_grad(model, theta_names),
        torch.random.fork_rng(devices=rng_devices(device)),
    ):
        torch.manual_seed(cfg.seed)  # dropout in train mode draws from here
        opt = torch.optim.SGD(
            theta_params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        avoid_single = cfg.backbone_mode == "train"
        for epoch in range(cfg.epochs):
            order = torch.randperm(kept.numel(), generator=generator)
            total, count = 0.0, 0
            for idx in _batches(order, cfg.batch_size, avoid_single):
                w, y = w_all[idx.to(device)], y_all[idx.to(device)]
                if use_cached:
                    logits = F.linear(features[idx.to(device)].to(dtype), head_w, head_b)
                else:
                    logits = model(as_inputs(x_kept[idx], device, dtype))
                ce = F.cross_entropy(logits, y, reduction="none")
                loss = -(w * ce).sum() / w.sum() + cfg.alpha * _l1(theta_params)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.numel()
                count += idx.numel()
            losses.append(total / count)
            _call(progress, "unlearning", (epoch + 1) / cfg.epochs)
        opt.zero_grad(set_to_none=True)
    t_end = time.perf_counter()

    stats: dict[str, Any] = {
        "method": "imu",
        "selection": info,
        "kept_indices": kept.tolist(),
        "weights": [float(v) for v in weights.tolist()],
        "loss_per_epoch": losses,
        "seconds": {
            "influence": t_influence - t_start,
            "selection": t_selection - t_influence,
            "unlearning": t_end - t_selection,
            "total": t_end - t_start,
        },
        "influence_method": infl.method,
        "influence_notes": list(infl.notes),
        "theta": theta_names,
        "theta_numel": int(infl.theta_numel),
        "head": infl.head,
        "cached_features": bool(use_cached),
        "device": str(device),
        "config": cfg.to_dict(),
    }
    return UnlearnResult(model=model, stats=stats)


def gradient_ascent(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 256,
    params: Sequence[str] | None = None,
    progress: Progress | None = None,
    momentum: float = 0.0,
    train_mode: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> UnlearnResult:
    """Baseline ``ga``: SGD ascent on the mean cross-entropy of the whole forget set.

    ``params`` None = every parameter; else parameter-name prefixes as in IMUConfig. The
    model is in train mode during the epochs (as a training loop would be) unless
    ``train_mode`` is False. Only "unlearning" progress is reported (there is no influence
    phase).
    """
    for name, value, lo in (("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(lr, (int, float)) and 0 < lr <= 10):
        raise ValueError(f"lr must be in (0, 10], got {lr!r}")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    inputs = torch.as_tensor(inputs)
    n = check_pair(inputs, labels, "forget set")
    if n == 0:
        raise ValueError("the forget set is empty")
    labels = as_labels(labels)
    dev = resolve_device(device)
    model.to(dev)
    dtype = model_dtype(model)
    if params is None:
        names = [name for name, _ in model.named_parameters()]
    else:
        names = [name for name, _ in resolve_theta(model, list(params), None)]
    chosen = [p for name, p in model.named_parameters() if name in set(names)]
    if not chosen:
        raise ValueError("the model has no parameters to update")

    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    _call(progress, "unlearning", 0.0)
    with (
        preserved_modes(model, train=train_mode),
        only_these_require_grad(model, names),
        torch.random.fork_rng(devices=rng_devices(dev)),
    ):
        torch.manual_seed(seed)
        opt = torch.optim.SGD(chosen, lr=lr, momentum=momentum)
        for epoch in range(epochs):
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for idx in _batches(order, batch_size, avoid_single=train_mode):
                x = as_inputs(inputs[idx], dev, dtype)
                y = labels[idx].to(dev)
                ce = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                (-ce).backward()
                opt.step()
                total += float(ce.detach()) * idx.numel()
            losses.append(total / n)
            _call(progress, "unlearning", (epoch + 1) / epochs)
        opt.zero_grad(set_to_none=True)
    t1 = time.perf_counter()
    stats = {
        "method": "ga",
        "n": n,
        "forget_loss_per_epoch": losses,
        "seconds": {"unlearning": t1 - t0, "total": t1 - t0},
        "params": names if params is not None else "all",
        "config": {
            "epochs": epochs,
            "lr": float(lr),
            "batch_size": batch_size,
            "momentum": float(momentum),
            "train_mode": bool(train_mode),
            "seed": seed,
        },  # fmt: skip
        "device": str(dev),
    }
    return UnlearnResult(model=model, stats=stats)
