"""LETHE_DEVICE resolution for the process that runs a job.

CUDA must only be initialised in the process that runs the job: a prefork Celery parent that
touched CUDA would hand its children a CUDA context they cannot use after fork. So this module
imports torch lazily and is only ever called from the job-running code path (the pool child,
or the embedded executor), never from the Celery main process, the reaper or the API.
"""

from __future__ import annotations

from worker.imu.devices import DEVICE_NAMES, parse_device


class DeviceUnavailable(RuntimeError):
    """LETHE_DEVICE names a device this machine does not have."""


def resolve_device(setting: str) -> str:
    """`auto` → `cuda` when a GPU is visible, else `cpu`; `cuda[:N]` and `mps` must exist."""
    setting = (setting or "auto").strip().lower()
    try:
        kind, index_given = parse_device(setting)
    except ValueError:
        raise DeviceUnavailable(f"LETHE_DEVICE={setting!r}: expected {DEVICE_NAMES}") from None
    if kind == "cpu":
        return setting
    import torch

    from worker.imu.config import resolve_device as engine_device

    if kind == "auto":  # the engine's own rule, as a string for the job row
        return engine_device("auto").type
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceUnavailable(f"LETHE_DEVICE={setting!r} but MPS is not available here")
        return setting
    if not torch.cuda.is_available():
        raise DeviceUnavailable(f"LETHE_DEVICE={setting!r} but CUDA is not available here")
    index = index_given or 0
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceUnavailable(
            f"LETHE_DEVICE={setting!r} but only {count} CUDA device(s) are visible"
        )
    return setting
