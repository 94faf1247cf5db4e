"""IMU unlearning (ALGORITHM.md, all steps) and the gradient-ascent baseline.

Both functions update the model in place and return it in an ``UnlearnResult`` whose
``stats`` is plain JSON (it is stored with the job). Both run their ascent through the same
controller (``worker.imu.calibration``): calibrated by default, the fixed schedule with
``calibration="off"``. ``heldout`` is the guard half of the eval set (records the model
never trained on) and ``class_wise`` says whether the forget set is whole classes; both
shape the calibration's target and guard. ``membership`` (a ``MembershipTest`` over the
forget records, the model's members and its non-members) makes the calibration aim at
per-record membership evidence (ALGORITHM.md §6) instead of the loss-AUC test.

``progress(phase, fraction)`` is called with phase "influence" and "unlearning" (at least
once per epoch or step); an exception raised by it propagates unchanged — that is how the
worker cancels. On any exception the parameters keep the steps already taken (the caller
discards the model), while the train/eval flags and ``requires_grad`` flags are restored.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.imu._util import (
    Progress,
    as_inputs,
    as_labels,
    ascent_term,
    batchnorm_layers,
    check_pair,
    find_head,
    frozen_norm_statistics,
    model_dtype,
    only_these_require_grad,
    preserved_modes,
    resolve_theta,
    rng_devices,
)
from worker.imu.calibration import AscentProblem, calibrated_ascent, fixed_schedule
from worker.imu.checks import build_checks
from worker.imu.config import GAConfig, IMUConfig, StepConfig, resolve_device
from worker.imu.influence import compute_influence
from worker.imu.membership import MembershipTest
from worker.imu.selection import select_and_weight

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class UnlearnResult:
    model: nn.Module  # the module passed in, updated in place
    stats: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable


def _call(progress: Progress | None, phase: str, fraction: float) -> None:
    if progress is not None:
        progress(phase, float(fraction))


def _forget_set(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.as_tensor(inputs)
    n = check_pair(inputs, labels, "forget set")
    if n == 0:
        raise ValueError("the forget set is empty")
    return inputs, as_labels(labels)


def _heldout(heldout: Pair | None) -> Pair | None:
    if heldout is None:
        return None
    x, y = torch.as_tensor(heldout[0]), as_labels(heldout[1])
    check_pair(x, y, "held-out set")
    return (x, y) if y.numel() else None


def _has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorm_layers(model))


def _ascend(
    problem: AscentProblem,
    cfg: StepConfig,
    make_checks: Callable[[], Any],
    *,
    alpha: float,
    l1_scale: float,
    cheap_checks: bool,
    class_wise: bool,
    progress: Progress | None,
) -> dict[str, Any]:
    """Run the fixed or the calibrated schedule inside the caller's mode contexts."""
    generator = torch.Generator().manual_seed(cfg.seed)
    if not cfg.calibrated:
        losses = fixed_schedule(
            problem,
            cfg,
            lr=cfg.lr,
            alpha=alpha,
            epochs=cfg.epochs,
            generator=generator,
            progress=progress,
        )
        return {"calibration": {"mode": "off"}, "loss_per_epoch": losses}
    every = cfg.check_every or (1 if cheap_checks else 4)
    outcome = calibrated_ascent(
        problem,
        make_checks(),
        cfg,
        l1_scale=l1_scale,
        generator=generator,
        progress=progress,
        check_every=every,
        max_drop=cfg.guard_drop_for(class_wise),
    )
    _call(progress, "unlearning", 1.0)
    return {"calibration": {"mode": "auto", "check_every": every, **outcome.as_stats()}}


def unlearn(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    config: IMUConfig | None = None,
    progress: Progress | None = None,
    *,
    heldout: Pair | None = None,
    class_wise: bool = False,
    membership: MembershipTest | None = None,
) -> UnlearnResult:
    """Run IMU on the forget set (inputs, labels); update θ of ``model`` in place.

    ``stats`` holds the selection info (n, candidates, kept, clip value, weight quantiles,
    fallback), ``kept_indices`` (into the forget set, most influential first), the
    calibration outcome (or the loss per epoch), seconds per phase, the influence path, θ
    names and the device.
    """
    cfg = config if config is not None else IMUConfig()
    cfg.validate()
    inputs, labels = _forget_set(inputs, labels)
    heldout = _heldout(heldout)
    n = int(labels.numel())
    device = resolve_device(cfg.device)
    model.to(device)
    dtype = model_dtype(model)
    t_start = time.perf_counter()

    # Steps 1-4. In eval mode with a final-Linear θ the head inputs are cached here.
    _call(progress, "influence", 0.0)
    infl = compute_influence(
        model,
        inputs,
        labels,
        params=cfg.params,
        damping=cfg.damping,
        batch_size=cfg.influence_batch_size,
        keep_features=cfg.backbone_mode == "eval",
        progress=progress,
    )
    _call(progress, "influence", 1.0)
    t_influence = time.perf_counter()

    # Steps 5-6.
    kept, weights, info = select_and_weight(
        infl.scores, cfg.resolved_top_data, cfg.clip_quantile, keep_all=cfg.selects_all
    )
    t_selection = time.perf_counter()

    # Step 7.
    head = find_head(model, as_inputs(inputs[: min(n, 4)], device, dtype))
    theta = resolve_theta(model, cfg.params, head)
    theta_names = [name for name, _ in theta]
    all_features = infl.features
    infl.features = None
    # Cached head inputs: θ is the logits head and the backbone is frozen in eval mode.
    cached_head = head.module if all_features is not None and head is not None else None
    if cfg.backbone_mode != "eval":
        cached_head = None
    features = (
        all_features[kept.to(device)]
        if cached_head is not None and all_features is not None
        else None
    )
    w_all = weights.to(device=device, dtype=dtype)
    y_all = labels[kept].to(device)
    x_kept = inputs[kept]
    if cached_head is not None and head is not None:
        prefix = head.name + "." if head.name else ""
        assert {prefix + "weight", prefix + "bias"} >= set(theta_names)

    term = cfg.term_for(class_wise)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        on = idx.to(device)
        if features is not None and cached_head is not None:
            logits = F.linear(features[on].to(dtype), cached_head.weight, cached_head.bias)
        else:
            logits = model(as_inputs(x_kept[idx], device, dtype))
        w = w_all[on]
        return -(w * ascent_term(logits, y_all[on], term)).sum() / w.sum()

    train = cfg.backbone_mode == "train"
    problem = AscentProblem(
        model,
        [p for _, p in theta],
        int(kept.numel()),
        batch_loss,
        cfg.batch_size,
        train_mode=train,
        l1=True,
    )

    def make_checks() -> Any:
        return build_checks(
            model,
            (inputs, labels),
            heldout,
            class_wise=class_wise,
            forget_acc_target=cfg.forget_acc_target,
            seed=cfg.seed,
            head=cached_head,
            forget_features=all_features if cached_head is not None else None,
            membership=membership,
        )

    _call(progress, "unlearning", 0.0)
    with (
        preserved_modes(model, train=train),
        only_these_require_grad(model, theta_names),
        frozen_norm_statistics(model, frozen=cfg.calibrated),
        torch.random.fork_rng(devices=rng_devices(device)),
    ):
        torch.manual_seed(cfg.seed)  # dropout in train mode draws from here
        ascent = _ascend(
            problem,
            cfg,
            make_checks,
            alpha=cfg.alpha,
            l1_scale=cfg.l1_scale,
            cheap_checks=cached_head is not None or not (train and _has_batchnorm(model)),
            class_wise=class_wise,
            progress=progress,
        )
    t_end = time.perf_counter()

    stats: dict[str, Any] = {
        "method": "imu",
        "ascent_term": term,
        "selection": info,
        "kept_indices": kept.tolist(),
        "weights": [float(v) for v in weights.tolist()],
        **ascent,
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
        "cached_features": cached_head is not None,
        "device": str(device),
        "config": cfg.to_dict(),
    }
    return UnlearnResult(model=model, stats=stats)


def gradient_ascent(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    config: GAConfig | None = None,
    progress: Progress | None = None,
    *,
    heldout: Pair | None = None,
    class_wise: bool = False,
    membership: MembershipTest | None = None,
) -> UnlearnResult:
    """Baseline ``ga``: SGD ascent on the mean cross-entropy of the whole forget set.

    θ = every parameter unless ``config.params`` names prefixes. The model is in train mode
    during the steps unless ``config.train_mode`` is False. Only "unlearning" progress is
    reported (there is no influence phase).
    """
    cfg = config if config is not None else GAConfig()
    cfg.validate()
    inputs, labels = _forget_set(inputs, labels)
    heldout = _heldout(heldout)
    device = resolve_device(cfg.device)
    model.to(device)
    dtype = model_dtype(model)
    if cfg.params is None:
        names = [name for name, _ in model.named_parameters()]
    else:
        names = [name for name, _ in resolve_theta(model, cfg.params, None)]
    chosen = [p for name, p in model.named_parameters() if name in set(names)]
    if not chosen:
        raise ValueError("the model has no parameters to update")

    term = cfg.term_for(class_wise)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        x = as_inputs(inputs[idx], device, dtype)
        return -ascent_term(model(x), labels[idx].to(device), term).mean()

    problem = AscentProblem(
        model, chosen, int(labels.numel()), batch_loss, cfg.batch_size, train_mode=cfg.train_mode
    )

    def make_checks() -> Any:
        return build_checks(
            model,
            (inputs, labels),
            heldout,
            class_wise=class_wise,
            forget_acc_target=cfg.forget_acc_target,
            seed=cfg.seed,
            membership=membership,
        )

    t0 = time.perf_counter()
    _call(progress, "unlearning", 0.0)
    with (
        preserved_modes(model, train=cfg.train_mode),
        only_these_require_grad(model, names),
        frozen_norm_statistics(model, frozen=cfg.calibrated),
        torch.random.fork_rng(devices=rng_devices(device)),
    ):
        torch.manual_seed(cfg.seed)
        ascent = _ascend(
            problem,
            cfg,
            make_checks,
            alpha=0.0,
            l1_scale=0.0,
            cheap_checks=not (cfg.train_mode and _has_batchnorm(model)),
            class_wise=class_wise,
            progress=progress,
        )
    t1 = time.perf_counter()
    if "loss_per_epoch" in ascent:  # the ascent minimises -CE; report the forget loss itself
        ascent["forget_loss_per_epoch"] = [-v for v in ascent.pop("loss_per_epoch")]
    stats = {
        "method": "ga",
        "ascent_term": term,
        "n": int(labels.numel()),
        **ascent,
        "seconds": {"unlearning": t1 - t0, "total": t1 - t0},
        "params": names if cfg.params is not None else "all",
        "config": cfg.to_dict(),
        "device": str(device),
    }
    return UnlearnResult(model=model, stats=stats)


__all__ = ["UnlearnResult", "gradient_ascent", "unlearn"]
