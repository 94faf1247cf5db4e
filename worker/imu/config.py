"""IMUConfig: the hyper-parameters of one IMU run, with bounds checked on construction."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

BACKBONE_MODES = ("train", "eval")
_DEVICE_RE = re.compile(r"^(cpu|cuda|mps)(:\d{1,3})?$")


@dataclass
class IMUConfig:
    """Hyper-parameters of IMU (DESIGN §4); defaults are the authors' released values.

    params: None = weight and bias of the final ``nn.Linear`` producing the logits; else a
        list of parameter-name prefixes (``["layer4.1", "fc"]``) matched on dotted components.
    backbone_mode: ``"train"`` (default) reproduces the authors' loop (``model.train()``:
        BatchNorm uses batch statistics and its running statistics move). ``"eval"`` freezes
        the whole backbone in eval mode, so every tensor outside θ stays bit-identical, and
        for a final-Linear θ the features are computed once and the epochs run on the head
        alone (1.5-2.8x faster). The default was chosen by measurement: over the bench's
        Fashion-MNIST runs (bench/RESULTS.md) ``"train"`` is closer to retraining (mean
        Avg. Gap 8.5 vs 13.1 at each mode's best step size; 42.4 vs 59.6 at these defaults).
    device: None or ``"auto"`` = CUDA when available, else CPU.
    influence_batch_size: chunk size of the influence pass (memory bound, not a result knob).
    """

    top_data: float = 0.1
    clip_quantile: float = 0.93
    damping: float = 0.01
    alpha: float = 0.2
    lr: float = 0.01
    epochs: int = 10
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    params: list[str] | None = None
    backbone_mode: str = "train"
    seed: int = 0
    device: str | None = None
    influence_batch_size: int = 512

    # field -> (low, high, low inclusive, high inclusive)
    _FLOAT_BOUNDS = {
        "top_data": (0.0, 1.0, False, True),
        "clip_quantile": (0.0, 1.0, False, True),
        "damping": (0.0, 1e6, False, True),
        "alpha": (0.0, 1e3, True, True),
        "lr": (0.0, 10.0, False, True),
        "momentum": (0.0, 1.0, True, False),
        "weight_decay": (0.0, 1.0, True, True),
    }
    _INT_BOUNDS = {
        "epochs": (1, 10_000),
        "batch_size": (1, 1 << 20),
        "seed": (0, (1 << 63) - 1),
        "influence_batch_size": (1, 1 << 20),
    }

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range or of a wrong type."""
        for name, (lo, hi, lo_inc, hi_inc) in self._FLOAT_BOUNDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            try:
                value = float(value)
            except OverflowError:
                raise ValueError(f"{name} is out of range, got {value!r}") from None
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
            low_ok = value >= lo if lo_inc else value > lo
            high_ok = value <= hi if hi_inc else value < hi
            if not (low_ok and high_ok):
                lb, hb = "[" if lo_inc else "(", "]" if hi_inc else ")"
                raise ValueError(f"{name} must be in {lb}{lo}, {hi}{hb}, got {value!r}")
            setattr(self, name, value)
        for name, (lo, hi) in self._INT_BOUNDS.items():
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # JSON clients may send 10.0
                setattr(self, name, value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
        if self.params is not None:
            if isinstance(self.params, str):
                self.params = [self.params]
            if (
                not isinstance(self.params, (list, tuple))
                or not self.params
                or not all(isinstance(p, str) and p.strip() for p in self.params)
            ):
                raise ValueError(
                    f"params must be null or a non-empty list of parameter-name prefixes, "
                    f"got {self.params!r}"
                )
            self.params = [p.strip() for p in self.params]
        if self.backbone_mode not in BACKBONE_MODES:
            raise ValueError(
                f"backbone_mode must be one of {list(BACKBONE_MODES)}, got {self.backbone_mode!r}"
            )
        if self.device is not None and (
            not isinstance(self.device, str)
            or (self.device != "auto" and not _DEVICE_RE.match(self.device))
        ):
            raise ValueError(
                f"device must be null, 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}"
            )

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_overrides(
        cls, overrides: Mapping[str, Any] | None, base: IMUConfig | None = None
    ) -> IMUConfig:
        """Defaults (or ``base``) with ``overrides`` applied; unknown keys and out-of-range
        values raise ValueError naming the key. Used to bounds-check request params."""
        overrides = dict(overrides or {})
        known = set(cls.field_names())
        for key in overrides:
            if key not in known:
                raise ValueError(f"unknown parameter {key!r}; accepted: {sorted(known)}")
        values = (base or cls()).to_dict()
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable values."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if out["params"] is not None:
            out["params"] = list(out["params"])
        return out

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None/"auto" -> cuda when available, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
