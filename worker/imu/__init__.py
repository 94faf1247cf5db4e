"""IMU: Influence-guided Machine Unlearning (arXiv 2508.01620), a pure-PyTorch engine.

No Celery, HTTP or database imports here: the service imports this package for the
architecture registry and checkpoint checks, the worker for the algorithm.

    from worker.imu import IMUConfig, unlearn, evaluate
    result = unlearn(model, x_forget, y_forget, IMUConfig(), progress=lambda phase, f: ...)
"""

from worker.imu.config import GAConfig, IMUConfig, resolve_device
from worker.imu.evaluation import evaluate
from worker.imu.influence import compute_influence, influence_scores
from worker.imu.selection import select_and_weight
from worker.imu.unlearn import UnlearnResult, gradient_ascent, unlearn

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
