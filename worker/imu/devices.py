"""The device names the engine accepts: the one grammar for `IMUConfig.device` and for the
service's LETHE_DEVICE (service.settings validates it through service.engine).

torch-free on purpose: the API validates its settings at start-up without importing torch.
"""

from __future__ import annotations

import re

DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"
DEVICE_RE = re.compile(r"^(?:auto|(?P<kind>cpu|cuda|mps)(?::(?P<index>\d{1,3}))?)$")


def parse_device(name: str) -> tuple[str, int | None]:
    """``"cuda:1"`` → ``("cuda", 1)``, ``"auto"`` → ``("auto", None)``; ValueError otherwise."""
    match = DEVICE_RE.match(name)
    if match is None:
        raise ValueError(f"device must be {DEVICE_NAMES}, got {name!r}")
    index = match.group("index")
    return match.group("kind") or "auto", int(index) if index is not None else None
