"""The engine call of a job: request params -> IMUConfig/GAConfig -> unlearn/gradient_ascent,
and the stats kept with the job (key hashes only: metrics outlive the records)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service.domain.states import ENGINE_METHODS
from worker.imu import GAConfig, IMUConfig, gradient_ascent, unlearn
from worker.imu.unlearn import UnlearnResult
from worker.job_metrics import jsonable

Pair = tuple[Any, Any]


class InvalidParams(ValueError):
    """Request params the engine refuses (the service checks them at submission too)."""


def engine_config(method: str, params: dict[str, Any], device: str | None) -> IMUConfig | GAConfig:
    """The run's config; `policy` (release thresholds) is not an engine parameter."""
    engine_params = {k: v for k, v in params.items() if k != "policy"}
    if method not in ENGINE_METHODS:
        raise InvalidParams(f"unknown method {method!r}")
    overrides = {**engine_params, "device": device}
    try:
        if method == "imu":
            return IMUConfig.from_overrides(overrides)
        return GAConfig.from_overrides(overrides)
    except (ValueError, TypeError) as exc:
        raise InvalidParams(f"{method}: {exc}") from None


def run_engine(
    method: str,
    params: dict[str, Any],
    model: Any,
    forget: Pair,
    *,
    guard: Pair | None,
    class_wise: bool,
    device: str | None,
    progress: Callable[[str, float], None],
    key_hash: Callable[[int], str],
    membership: Any = None,
) -> dict[str, Any]:
    config = engine_config(method, params, device)
    x, y = forget
    # The engine reports its own phases ("influence", then "unlearning") from its first step.
    run: Callable[..., UnlearnResult] = (
        unlearn if isinstance(config, IMUConfig) else gradient_ascent
    )
    result = run(
        model,
        x,
        y,
        config,
        progress,
        heldout=guard,
        class_wise=class_wise,
        membership=membership,
    )
    stats = dict(result.stats)
    kept = stats.pop("kept_indices", None)
    stats.pop("weights", None)
    if kept is not None:
        stats["kept_key_sha256"] = [key_hash(i) for i in kept[:1000]]
    return jsonable(stats)
