"""IMU and gradient ascent on causal LMs: influence → selection and weights → weighted
ascent, run by the same controller as classifiers (``calibration.calibrated_ascent``) with
``TextChecks`` for targets and guards.

Two losses for the ascent on a batch B of kept records (weights w_i, ℓ_i = mean token NLL):

- ``ga``:  L = − Σ w_i ℓ_i / Σ w_i  (unbounded: it keeps pushing as ℓ_i grows);
- ``npo``: L = (2/β) Σ w_i softplus(β r_i) / Σ w_i with r_i = log π_θ(y_i) − log π_ref(y_i)
  (summed over the record's scored tokens, π_ref the model before unlearning) — negative
  preference optimisation (Zhang et al. 2024). Its gradient is the GA gradient scaled by
  2σ(β r_i), which fades once a record's likelihood has dropped, so the loss is bounded below.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.imu._util import Progress, only_these_require_grad, preserved_modes
from worker.imu.calibration import AscentProblem, calibrated_ascent, fixed_schedule
from worker.imu.config import (
    BATCH_SIZE,
    CLIP_QUANTILE,
    DAMPING,
    GUARD_MAX_DROP,
    L1_SCALE,
    PARAMS,
    THETA_HELP,
    TOP_DATA,
    StepConfig,
)
from worker.imu.lm_data import TokenBatch, record_losses
from worker.imu.lm_influence import lm_influence, lm_theta
from worker.imu.selection import select_and_weight
from worker.imu.settings import setting
from worker.imu.text_checks import TextChecks

LOSSES = ("ga", "npo")
METHODS = ("imu", "ga")


@dataclass
class LMUnlearnConfig(StepConfig):
    """Settings of LM unlearning; the StepConfig fields drive the controller, the IMU ones
    (``top_data`` ... ``l1_scale``) are IMUConfig's specs at their LM defaults."""

    params: list[str] | None = PARAMS.at(
        None,
        help=f"{THETA_HELP} null = the decoder blocks for imu, every parameter for ga.",
    )
    batch_size: int = BATCH_SIZE.at(8)
    guard_max_drop: float | None = GUARD_MAX_DROP.at(
        0.03, help="The largest drop of member-probe recall (absolute) the guard accepts."
    )
    method: str = setting(
        "imu",
        help='"imu" (influence weights, θ = decoder blocks by default, α‖θ‖₁) or "ga" '
        "(uniform weights, θ = every parameter, no L1); the request's method sets it.",
        choices=METHODS,
    )
    # npo won by measurement (bench/results/lm_fixture.md): never worse than ga on the
    # fixture's forget and retain recall, half the perplexity damage with guards off.
    loss: str = setting(
        "npo",
        help='The ascent loss: "ga" (weighted ascent, unbounded) or "npo" (negative '
        "preference optimisation, bounded below as a record's likelihood drops).",
        choices=LOSSES,
    )
    # Every record named in a deletion request must lose its verbatim recall.
    top_data: float = TOP_DATA.at(
        1.0, help="Share of the candidates kept; 1.0 = every named record takes part."
    )
    clip_quantile: float = CLIP_QUANTILE.at(0.93)
    damping: float = DAMPING.at(0.01)
    l1_scale: float = L1_SCALE.at(1e-3)
    npo_beta: float = setting(0.1, help="β of NPO.", gt=0.0, le=100.0)
    recall_target: float = setting(
        0.0,
        help="Target on the forget set's greedy verbatim recall (with its NLL or min-k AUC "
        "looking unseen).",
        ge=0.0,
        le=1.0,
    )
    ppl_max_rise: float = setting(
        0.1,
        help="The largest relative rise of held-out perplexity the guard accepts.",
        ge=0.0,
        le=100.0,
    )
    chunk_bytes: int = setting(
        256 << 20,
        help="Bound on the per-sample gradient block of the influence pass (memory, not a "
        "result knob).",
        ge=1 << 20,
        le=1 << 36,
    )
    lora_rank: int = setting(
        0,
        help="0 = θ is a subset of the model's own parameters (params); r > 0 = θ is LoRA "
        "adapters of rank r on lora_targets, merged back after.",
        ge=0,
        le=1024,
    )
    lora_alpha: int = setting(
        16,
        help="LoRA scale numerator: the adapters are scaled by lora_alpha / r.",
        ge=1,
        le=1 << 16,
    )
    lora_targets: list[str] | None = setting(
        None,
        kind="names",
        help="The linear layers that get LoRA adapters; null = the attention projections.",
        nullable=True,
    )

    def validate(self) -> None:
        super().validate()
        if self.lora_rank and self.params is not None:
            raise ValueError("params and lora_rank exclude each other: LoRA's θ is the adapters")


def config_for(method: str, params: dict[str, Any]) -> LMUnlearnConfig:
    """The config of a deletion request: its ``method`` (``imu`` | ``ga``) and its params
    (``policy`` is the release policy's, not the engine's). ValueError names the field."""
    engine = {k: v for k, v in params.items() if k != "policy"}
    if "method" in engine:
        raise ValueError("unknown parameter 'method'; the request's method field sets it")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    return LMUnlearnConfig.from_overrides({**engine, "method": method})


@dataclass
class LMUnlearnResult:
    model: nn.Module  # the module passed in, updated in place
    stats: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def make_batch_loss(
    model: nn.Module,
    forget: TokenBatch,
    kept: torch.Tensor,
    weights: torch.Tensor,
    loss: str,
    beta: float,
):
    """The loss of a mini-batch of positions into ``kept`` (what the controller cycles)."""
    device = next(model.parameters()).device
    w_all = weights.to(device, torch.float32)
    ref = None
    if loss == "npo":
        with torch.no_grad(), preserved_modes(model, train=False):
            nll, count = record_losses(model, forget.take(kept))
            ref = (nll * count).detach()  # −log π_ref(y_i), summed over scored tokens

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        nll, count = record_losses(model, forget.take(kept[idx]))
        w = w_all[idx.to(device)]
        if loss == "ga":
            return -(w * nll).sum() / w.sum()
        assert ref is not None
        log_ratio = ref[idx.to(device)] - nll * count  # log π_θ − log π_ref
        return (2.0 / beta) * (w * F.softplus(beta * log_ratio)).sum() / w.sum()

    return batch_loss


def unlearn_lm(
    model: nn.Module,
    forget: TokenBatch,
    heldout: TokenBatch | None,
    member_probe: TokenBatch | None = None,
    cfg: LMUnlearnConfig | None = None,
    progress: Progress | None = None,
) -> LMUnlearnResult:
    """Forget ``forget`` in place. With ``calibration="auto"`` the controller stops at the
    text target or when the guard gives up, keeping the last state that passed the guard."""
    cfg = cfg or LMUnlearnConfig()
    if cfg.lora_rank:
        from worker.imu.lm_lora import lora_attached

        with lora_attached(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) as (
            adapted,
            names,
        ):
            inner = dataclasses.replace(cfg, params=names, lora_rank=0)
            result = _unlearn(adapted, forget, heldout, member_probe, inner, progress)
        result.stats["config"] = dataclasses.asdict(cfg)
        result.stats["lora"] = {
            "rank": cfg.lora_rank,
            "alpha": cfg.lora_alpha,
            "adapters": len(names),
            "merged": True,
        }
        return LMUnlearnResult(model, result.stats)
    return _unlearn(model, forget, heldout, member_probe, cfg, progress)


def _unlearn(
    model: nn.Module,
    forget: TokenBatch,
    heldout: TokenBatch | None,
    member_probe: TokenBatch | None,
    cfg: LMUnlearnConfig,
    progress: Progress | None,
) -> LMUnlearnResult:
    t0 = time.perf_counter()
    stats: dict[str, Any] = {"config": dataclasses.asdict(cfg), "loss": cfg.loss}
    n = len(forget)
    if cfg.method == "imu":
        infl = lm_influence(
            model,
            forget,
            params=cfg.params,
            damping=cfg.damping,
            chunk_bytes=cfg.chunk_bytes,
            cache_bytes=cfg.chunk_bytes,
            progress=progress,
        )
        kept, weights, sel = select_and_weight(infl.scores, cfg.top_data, cfg.clip_quantile)
        theta = lm_theta(model, cfg.params)
        stats["influence"] = {
            "theta_numel": infl.theta_numel,
            "chunk": infl.chunk,
            "streamed": infl.streamed,
            "theta": infl.theta[:50],
        }
        stats["selection"] = sel
    else:
        kept = torch.arange(n, dtype=torch.int64)
        weights = torch.ones(n, dtype=torch.float64)
        theta = lm_theta(model, cfg.params or [name for name, _ in model.named_parameters()])
    t1 = time.perf_counter()
    names = [name for name, _ in theta]
    with only_these_require_grad(model, names), preserved_modes(model, train=False):
        problem = AscentProblem(
            model,
            [p for _, p in theta],
            int(kept.numel()),
            make_batch_loss(model, forget, kept, weights, cfg.loss, cfg.npo_beta),
            cfg.batch_size,
            train_mode=False,
            l1=cfg.method == "imu",
        )
        generator = torch.Generator().manual_seed(cfg.seed)
        if cfg.calibrated:
            checks = TextChecks(
                model,
                forget,
                heldout,
                member_probe,
                recall_target=cfg.recall_target,
                ppl_max_rise=cfg.ppl_max_rise,
            )
            every = cfg.check_every or 1
            outcome = calibrated_ascent(
                problem,
                checks,  # type: ignore[arg-type]
                cfg,
                l1_scale=cfg.l1_scale if problem.l1 else 0.0,
                generator=generator,
                progress=progress,
                check_every=every,
                max_drop=cfg.guard_drop_for(class_wise=False),
            )
            stats["calibration"] = {"mode": "auto", "check_every": every, **outcome.as_stats()}
        else:
            losses = fixed_schedule(
                problem,
                cfg,
                lr=cfg.lr,
                alpha=0.0,
                epochs=cfg.epochs,
                generator=generator,
                progress=progress,
            )
            stats["calibration"] = {"mode": "off", "epoch_losses": losses}
    for p in model.parameters():
        p.grad = None
    stats["timings"] = {"influence_s": t1 - t0, "unlearning_s": time.perf_counter() - t1}
    stats["peak_rss_mib"] = _peak_rss_mib()
    return LMUnlearnResult(model, stats)
