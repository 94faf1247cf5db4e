"""IMU: Influence-guided Machine Unlearning (arXiv 2508.01620), a pure-PyTorch engine.

No Celery, HTTP or database imports here: the service reaches this package through
`service.engine` only (parameter configs, architecture and checkpoint checks, recipes), the
worker for the algorithm.

    from worker.imu import IMUConfig, unlearn, evaluate
    result = unlearn(model, x_forget, y_forget, IMUConfig(), progress=lambda phase, f: ...)

The names below are imported on first use (PEP 562), so that torch-free modules such as
`worker.imu.devices` can be imported without loading torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.imu.config import GAConfig, IMUConfig, resolve_device
    from worker.imu.evaluation import evaluate
    from worker.imu.influence import compute_influence, influence_scores
    from worker.imu.selection import select_and_weight
    from worker.imu.unlearn import UnlearnResult, gradient_ascent, unlearn

_HOMES = {
    "GAConfig": "config",
    "IMUConfig": "config",
    "resolve_device": "config",
    "evaluate": "evaluation",
    "compute_influence": "influence",
    "influence_scores": "influence",
    "select_and_weight": "selection",
    "UnlearnResult": "unlearn",
    "gradient_ascent": "unlearn",
    "unlearn": "unlearn",
}

__all__ = [
    "GAConfig",
    "IMUConfig",
    "UnlearnResult",
    "compute_influence",
    "evaluate",
    "gradient_ascent",
    "influence_scores",
    "resolve_device",
    "select_and_weight",
    "unlearn",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'worker.imu' has no attribute {name!r}")
    return getattr(importlib.import_module(f"worker.imu.{home}"), name)


class _Engine(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the submodule `worker.imu.unlearn` binds it on the package, which would
        # hide the function `unlearn`: the names above always mean the functions.
        if name in _HOMES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Engine
