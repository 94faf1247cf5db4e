"""Run configurations, bounds-checked on construction: IMUConfig (the method) and GAConfig
(the gradient-ascent baseline). Both share the step and calibration settings (ALGORITHM.md §5)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

import torch

from worker.imu.settings import setting, spec, specs

BACKBONE_MODES = ("train", "eval")
CALIBRATION_MODES = ("auto", "off")
ASCENT_TERMS = ("auto", "ce", "margin")
# With calibration on, these are chosen by the controller; setting them is a mistake to name.
CALIBRATED_FIELDS = ("lr", "alpha", "epochs")
# guard_max_drop by request kind when it is left unset (ALGORITHM.md §5).
GUARD_DROP_CLASS_WISE = 0.03
GUARD_DROP_OTHER = 0.02
PAPER_TOP_DATA = 0.1  # the authors' released value (calibration off)

# Settings IMUConfig and the language-model config share: one spec each, placed by `.at`.
BATCH_SIZE = spec("int", help="Mini-batch size of the unlearning steps.", ge=1, le=1 << 20)
GUARD_MAX_DROP = spec(
    "float",
    help="Utility drop on the guard half that triggers a backtrack; null = 0.03 for "
    "class-wise requests and 0.02 for others.",
    ge=0.0,
    le=1.0,
    nullable=True,
)
THETA_HELP = (
    "The parameters to update (θ): parameter-name prefixes matched on dotted components "
    '(["layer4.1", "fc"]);'
)
PARAMS = spec(
    "names",
    help=f"{THETA_HELP} null = the method's default.",
    nullable=True,
    items="parameter-name prefixes",
)
TOP_DATA = spec(
    "float",
    help="Share of the negatively influential records kept (the paper's selection); null = "
    "every named record under calibration, the authors' 0.1 with calibration off.",
    gt=0.0,
    le=1.0,
    nullable=True,
)
CLIP_QUANTILE = spec(
    "float", help="Quantile at which the sample weights √|I| are clipped.", gt=0.0, le=1.0
)
DAMPING = spec("float", help="λ added to the diagonal Fisher.", gt=0.0, le=1e6)
L1_SCALE = spec(
    "float",
    help="κ, the calibrated L1 shrink per step as a share of θ's RMS (α = κ‖θ‖/(√P·lr)).",
    ge=0.0,
    le=0.1,
)


@dataclass
class StepConfig:
    """Settings common to IMU and gradient ascent; each field's ``setting`` says what it
    means and accepts (ALGORITHM.md §5 explains the calibration)."""

    lr: float = setting(
        0.01, help="Step size of the fixed schedule (calibration off).", gt=0.0, le=10.0
    )
    epochs: int = setting(
        10, help="Passes over the kept samples (calibration off).", ge=1, le=10_000
    )
    batch_size: int = BATCH_SIZE.at(256)
    momentum: float = setting(0.9, help="SGD momentum.", ge=0.0, lt=1.0)
    weight_decay: float = setting(5e-4, help="SGD weight decay.", ge=0.0, le=1.0)
    params: list[str] | None = PARAMS.at(None)
    seed: int = setting(
        0,
        help="Random seed (shuffling; the eval split is keyed separately).",
        ge=0,
        le=(1 << 63) - 1,
    )
    device: str | None = setting(
        None,
        kind="device",
        help='null or "auto" = CUDA when available, else CPU.',
        nullable=True,
    )
    calibration: str = setting(
        "auto",
        help='"auto" chooses the step size per model, stops at a forgetting target and guards '
        "utility on held-out records (lr, alpha and epochs are then the controller's, and "
        'BatchNorm running statistics stay fixed); "off" runs the fixed schedule for '
        "reproduction.",
        choices=CALIBRATION_MODES,
    )
    step_scale: float = setting(
        1e-3,
        help="η, the step length as a share of ‖θ‖ (lr = η‖θ‖/‖∇L(θ₀)‖).",
        gt=0.0,
        le=0.1,
    )
    max_steps: int = setting(200, help="Budget of optimiser steps.", ge=1, le=100_000)
    # Random requests seldom reach their target, so they end at the guard's edge and the
    # held-out half the policy judges drops by the guard plus its own noise: hence 0.02.
    guard_max_drop: float | None = GUARD_MAX_DROP.at(None)
    max_backtracks: int = setting(4, help="How many guard failures before giving up.", ge=0, le=20)
    check_every: int = setting(
        0,
        help="Steps between checks (a forward over the guard half); 0 = every step, or every "
        "4 for BatchNorm backbones that cannot use cached features.",
        ge=0,
        le=1000,
    )
    forget_acc_target: float = setting(
        0.05, help="Class-wise target on forget accuracy.", ge=0.0, le=1.0
    )
    ascent_term: str = setting(
        "auto",
        help='The per-sample quantity the steps raise: "ce" (cross-entropy, the authors\'), '
        '"margin" (mean of the other logits minus the true-class logit) or "auto" = margin '
        "for class-wise requests under calibration, else ce.",
        choices=ASCENT_TERMS,
    )

    def __post_init__(self) -> None:
        self.validate()

    @property
    def calibrated(self) -> bool:
        return self.calibration == "auto"

    def guard_drop_for(self, class_wise: bool) -> float:
        """The guard a request gets (``guard_max_drop`` resolved)."""
        if self.guard_max_drop is not None:
            return self.guard_max_drop
        return GUARD_DROP_CLASS_WISE if class_wise else GUARD_DROP_OTHER

    def term_for(self, class_wise: bool) -> str:
        """The ascent term a request gets (``ascent_term`` resolved)."""
        if self.ascent_term != "auto":
            return self.ascent_term
        return "margin" if class_wise and self.calibrated else "ce"

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range or of a wrong type."""
        if isinstance(self.params, str):
            self.params = [self.params]  # one prefix, given bare
        elif isinstance(self.params, tuple):
            self.params = list(self.params)
        for f, rule in specs(self):
            setattr(self, f.name, rule.check(f.name, getattr(self, f.name)))
        if self.params is not None:
            self.params = [p.strip() for p in self.params]

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any] | None, base: Self | None = None) -> Self:
        """Defaults (or ``base``) with ``overrides`` applied; unknown keys, out-of-range
        values and fields the calibration chooses raise ValueError naming the key. Used to
        bounds-check request params."""
        overrides = dict(overrides or {})
        known = set(cls.field_names())
        for key in overrides:
            if key not in known:
                raise ValueError(f"unknown parameter {key!r}; accepted: {sorted(known)}")
        start = base or cls()
        values = start.to_dict()
        values.update(overrides)
        config = cls(**values)
        if config.calibrated:
            # Restating a value is harmless (a stored config round-trips); changing one is not.
            fixed = [
                k
                for k in CALIBRATED_FIELDS
                if k in overrides and getattr(config, k) != getattr(start, k)
            ]
            if fixed:
                raise ValueError(
                    f"{fixed[0]} is chosen by the calibration; set calibration to 'off' to fix it"
                )
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable values."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if out["params"] is not None:
            out["params"] = list(out["params"])
        return out

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)


@dataclass
class IMUConfig(StepConfig):
    """Hyper-parameters of IMU (ALGORITHM.md); with ``calibration="off"`` the defaults are
    the authors' released values."""

    params: list[str] | None = PARAMS.at(
        None, help=f"{THETA_HELP} null = weight and bias of the final nn.Linear (the logits)."
    )
    top_data: float | None = TOP_DATA.at(None)
    clip_quantile: float = CLIP_QUANTILE.at(0.93)
    damping: float = DAMPING.at(0.01)
    alpha: float = setting(
        0.2, help="Weight of the L1 penalty on θ (calibration off).", ge=0.0, le=1e3
    )
    # "train" won by measurement (bench/RESULTS.md).
    backbone_mode: str = setting(
        "train",
        help='"train" runs the authors\' loop (BatchNorm on batch statistics, its running '
        'statistics left as they were under calibration); "eval" freezes the backbone, so '
        "every tensor outside θ stays bit-identical and a final-Linear θ steps on cached "
        "features.",
        choices=BACKBONE_MODES,
    )
    l1_scale: float = L1_SCALE.at(1e-3)
    influence_batch_size: int = setting(
        512,
        help="Chunk size of the influence pass (a memory bound, not a result knob).",
        ge=1,
        le=1 << 20,
    )

    @property
    def selects_all(self) -> bool:
        """Every record takes part (top_data left unset under calibration)."""
        return self.top_data is None and self.calibrated

    @property
    def resolved_top_data(self) -> float:
        if self.top_data is not None:
            return self.top_data
        return 1.0 if self.calibrated else PAPER_TOP_DATA


@dataclass
class GAConfig(StepConfig):
    """Gradient-ascent baseline: ascent on the mean forget loss over θ (default: every
    parameter). With ``calibration="off"`` the defaults are the authors' settings (SGD lr
    0.01, momentum 0.9, weight decay 5e-4, 10 epochs, train mode)."""

    params: list[str] | None = PARAMS.at(None, help=f"{THETA_HELP} null = every parameter.")
    train_mode: bool = setting(
        True,
        help="The model is in train mode during the steps, as a training loop would be.",
    )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None/"auto" -> cuda when available, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
