"""IMU: Influence-guided Machine Unlearning (arXiv 2508.01620), a pure-PyTorch engine.

No Celery, HTTP or database imports here: the service imports this package for the
architecture registry and checkpoint checks, the worker for the algorithm.
"""

from worker.imu.config import IMUConfig, resolve_device

__all__ = ["IMUConfig", "resolve_device"]
