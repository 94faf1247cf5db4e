"""Run configurations, bounds-checked on construction: IMUConfig (the method) and GAConfig
(the gradient-ascent baseline). Both share the step and calibration settings (ALGORITHM.md §5)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch

from worker.imu.devices import DEVICE_NAMES, DEVICE_RE

BACKBONE_MODES = ("train", "eval")
CALIBRATION_MODES = ("auto", "off")
ASCENT_TERMS = ("auto", "ce", "margin")
# With calibration on, these are chosen by the controller; setting them is a mistake to name.
CALIBRATED_FIELDS = ("lr", "alpha", "epochs")
# guard_max_drop by request kind when it is left unset (ALGORITHM.md §5).
GUARD_DROP_CLASS_WISE = 0.03
GUARD_DROP_OTHER = 0.02
OPTIONAL_FLOATS = ("guard_max_drop", "top_data")  # None = chosen per request / mode
PAPER_TOP_DATA = 0.1  # the authors' released value (calibration off)

Bounds = dict[str, tuple[float, float, bool, bool]]  # (low, high, low inclusive, high incl.)


@dataclass
class StepConfig:
    """Settings common to IMU and gradient ascent.

    calibration: ``"auto"`` (default) chooses the step size per model, stops at a forgetting
        target and guards utility on held-out records (ALGORITHM.md §5); ``lr``, ``alpha``
        and ``epochs`` are then chosen by the controller and may not be set, and BatchNorm
        running statistics stay fixed during train-mode steps. ``"off"`` runs the fixed
        schedule (``epochs`` passes at ``lr``, running statistics moving) for reproduction.
    step_scale: η, the step length as a share of ‖θ‖ (lr = η‖θ‖/‖∇L(θ₀)‖).
    max_steps: budget of optimiser steps. max_backtracks: how many guard failures before
        giving up.
    guard_max_drop: utility drop on the guard half that triggers a backtrack; null (default)
        = 0.03 for class-wise requests and 0.02 for others. Random requests seldom reach their
        target, so they usually end at the guard's edge, and the held-out half the policy
        judges then drops by the guard's value plus its own noise; class-wise requests stop
        at their target well inside the guard.
    check_every: steps between checks; 0 = every step, or every 4 for BatchNorm backbones
        that cannot use cached features (a check is a forward over the guard half).
    forget_acc_target: class-wise target on forget accuracy.
    ascent_term: the per-sample quantity the steps raise: ``"ce"`` (cross-entropy, the
        authors'), ``"margin"`` (mean of the other logits minus the true-class logit) or
        ``"auto"`` (default) = margin for class-wise requests under calibration, else ce
        (ALGORITHM.md §5).
    device: None or ``"auto"`` = CUDA when available, else CPU.
    """

    lr: float = 0.01
    epochs: int = 10
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    params: list[str] | None = None
    seed: int = 0
    device: str | None = None
    calibration: str = "auto"
    step_scale: float = 1e-3
    max_steps: int = 200
    guard_max_drop: float | None = None
    max_backtracks: int = 4
    check_every: int = 0
    forget_acc_target: float = 0.05
    ascent_term: str = "auto"

    _FLOAT_BOUNDS: ClassVar[Bounds] = {
        "lr": (0.0, 10.0, False, True),
        "momentum": (0.0, 1.0, True, False),
        "weight_decay": (0.0, 1.0, True, True),
        "step_scale": (0.0, 0.1, False, True),
        "guard_max_drop": (0.0, 1.0, True, True),
        "forget_acc_target": (0.0, 1.0, True, True),
    }
    _INT_BOUNDS: ClassVar[dict[str, tuple[int, int]]] = {
        "epochs": (1, 10_000),
        "batch_size": (1, 1 << 20),
        "seed": (0, (1 << 63) - 1),
        "max_steps": (1, 100_000),
        "max_backtracks": (0, 20),
        "check_every": (0, 1000),
    }
    _CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "calibration": CALIBRATION_MODES,
        "ascent_term": ASCENT_TERMS,
    }

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
        for name, (lo, hi, lo_inc, hi_inc) in self._FLOAT_BOUNDS.items():
            if name in OPTIONAL_FLOATS and getattr(self, name) is None:
                continue
            setattr(self, name, _checked_float(name, getattr(self, name), lo, hi, lo_inc, hi_inc))
        for name, (lo_i, hi_i) in self._INT_BOUNDS.items():
            setattr(self, name, _checked_int(name, getattr(self, name), lo_i, hi_i))
        for name, choices in self._CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}"
                )
        if self.params is not None:
            if isinstance(self.params, str):
                self.params = [self.params]
            if (
                not isinstance(self.params, list | tuple)
                or not self.params
                or not all(isinstance(p, str) and p.strip() for p in self.params)
            ):
                raise ValueError(
                    f"params must be null or a non-empty list of parameter-name prefixes, "
                    f"got {self.params!r}"
                )
            self.params = [p.strip() for p in self.params]
        if self.device is not None and (
            not isinstance(self.device, str) or not DEVICE_RE.match(self.device)
        ):
            raise ValueError(f"device must be null or {DEVICE_NAMES}, got {self.device!r}")

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
    the authors' released values.

    params: None = weight and bias of the final ``nn.Linear`` producing the logits; else a
        list of parameter-name prefixes (``["layer4.1", "fc"]``) matched on dotted components.
    backbone_mode: ``"train"`` (default) reproduces the authors' loop (``model.train()``:
        BatchNorm uses batch statistics; its running statistics move with calibration off
        and stay fixed with it on, so every buffer is left as it was). ``"eval"`` freezes
        the whole backbone in eval mode, so every tensor outside θ stays bit-identical, and
        for a final-Linear θ the features are computed once and the steps run on the head
        alone. The default was chosen by measurement (bench/RESULTS.md).
    top_data: share of the negatively influential records kept (the paper's selection).
        null (default) = every named record takes part under calibration (a deletion
        request names each record to forget; ascending 1 of 3 left the others memorised),
        and the authors' 0.1 with calibration off.
    l1_scale: κ, the calibrated L1 shrink per step as a share of θ's RMS
        (α = κ‖θ‖/(√P·lr)).
    influence_batch_size: chunk size of the influence pass (memory bound, not a result knob).
    """

    top_data: float | None = None
    clip_quantile: float = 0.93
    damping: float = 0.01
    alpha: float = 0.2
    backbone_mode: str = "train"
    l1_scale: float = 1e-3
    influence_batch_size: int = 512

    @property
    def selects_all(self) -> bool:
        """Every record takes part (top_data left unset under calibration)."""
        return self.top_data is None and self.calibrated

    @property
    def resolved_top_data(self) -> float:
        if self.top_data is not None:
            return self.top_data
        return 1.0 if self.calibrated else PAPER_TOP_DATA

    _FLOAT_BOUNDS: ClassVar[Bounds] = {
        **StepConfig._FLOAT_BOUNDS,
        "top_data": (0.0, 1.0, False, True),
        "clip_quantile": (0.0, 1.0, False, True),
        "damping": (0.0, 1e6, False, True),
        "alpha": (0.0, 1e3, True, True),
        "l1_scale": (0.0, 0.1, True, True),
    }
    _INT_BOUNDS: ClassVar[dict[str, tuple[int, int]]] = {
        **StepConfig._INT_BOUNDS,
        "influence_batch_size": (1, 1 << 20),
    }
    _CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        **StepConfig._CHOICES,
        "backbone_mode": BACKBONE_MODES,
    }


@dataclass
class GAConfig(StepConfig):
    """Gradient-ascent baseline: ascent on the mean forget loss over θ (default: every
    parameter). With ``calibration="off"`` the defaults are the authors' settings (SGD lr
    0.01, momentum 0.9, weight decay 5e-4, 10 epochs, train mode).

    train_mode: the model is in train mode during the steps, as a training loop would be.
    """

    train_mode: bool = True

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.train_mode, bool):
            raise ValueError(f"train_mode must be true or false, got {self.train_mode!r}")


def _checked_float(
    name: str, value: Any, lo: float, hi: float, lo_inc: bool, hi_inc: bool
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{name} is out of range, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    low_ok = number >= lo if lo_inc else number > lo
    high_ok = number <= hi if hi_inc else number < hi
    if not (low_ok and high_ok):
        lb, hb = "[" if lo_inc else "(", "]" if hi_inc else ")"
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{hb}, got {value!r}")
    return number


def _checked_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON clients may send 10.0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return value


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None/"auto" -> cuda when available, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
