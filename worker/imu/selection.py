"""Selection and weighting of the forget samples (ALGORITHM.md §3)."""

from __future__ import annotations

import math
from typing import Any

import torch


def select_and_weight(
    scores: torch.Tensor,
    top_data: float = 0.1,
    clip_quantile: float = 0.93,
    *,
    keep_all: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Keep the samples with I_i < 0, largest |I_i| first, k = max(1, floor(top_data * #cand));
    weight w_i = sqrt|I_i| clipped from above at the ``clip_quantile`` quantile (linear
    interpolation) of the kept weights.

    Returns (indices into ``scores`` as int64, weights as float64, info). Ties in |I_i| keep
    the lower index first, so the selection is deterministic. When no score is negative
    (every gradient zero, or a zero mean gradient) all samples are kept with weight 1 and
    ``info["fallback"]`` says so. ``info`` is JSON-serialisable.
    """
    if not (isinstance(top_data, (int, float)) and 0.0 < top_data <= 1.0):
        raise ValueError(f"top_data must be in (0, 1], got {top_data!r}")
    if not (isinstance(clip_quantile, (int, float)) and 0.0 < clip_quantile <= 1.0):
        raise ValueError(f"clip_quantile must be in (0, 1], got {clip_quantile!r}")
    scores = torch.as_tensor(scores).detach().to("cpu", torch.float64).reshape(-1)
    n = scores.numel()
    if n == 0:
        raise ValueError("no scores to select from")
    if not torch.isfinite(scores).all():
        bad = torch.nonzero(~torch.isfinite(scores)).flatten()[:10].tolist()
        raise ValueError(f"influence scores are not finite at indices {bad}")

    candidates = torch.nonzero(scores < 0).flatten()
    info: dict[str, Any] = {
        "n": n,
        "candidates": int(candidates.numel()),
        "top_data": float(top_data),
        "clip_quantile": float(clip_quantile),
        "fallback": False,
    }
    if candidates.numel() == 0:
        indices = torch.arange(n, dtype=torch.int64)
        weights = torch.ones(n, dtype=torch.float64)
        info.update(
            fallback=True,
            fallback_reason="no sample has a negative influence score; all kept, equal weights",
            kept=n,
            clip_value=1.0,
            weight_min=1.0,
            weight_median=1.0,
            weight_max=1.0,
            weight_quantiles=_quantiles(weights),
        )
        return indices, weights, info

    magnitude = scores[candidates].abs()
    order = torch.sort(magnitude, descending=True, stable=True).indices
    k = max(1, math.floor(top_data * candidates.numel()))
    kept = candidates[order[:k]]
    raw = scores[kept].abs().sqrt()
    clip = float(torch.quantile(raw, clip_quantile, interpolation="linear"))
    weights = raw.clamp(max=clip)
    if keep_all and kept.numel() < n:
        rest = torch.nonzero(~torch.isin(torch.arange(n), kept)).flatten()
        kept = torch.cat([kept, rest])
        weights = torch.cat(
            [weights, torch.full((rest.numel(),), float(weights.min()), dtype=weights.dtype)]
        )
        k = n
    info.update(
        keep_all=keep_all,
        kept=int(k),
        clip_value=clip,
        weight_min=float(weights.min()),
        weight_median=float(torch.quantile(weights, 0.5)),
        weight_max=float(weights.max()),
        weight_quantiles=_quantiles(weights),
        score_min=float(scores.min()),
        score_max=float(scores.max()),
    )
    return kept.to(torch.int64), weights, info


def _quantiles(w: torch.Tensor) -> dict[str, float]:
    qs = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    vals = torch.quantile(w.to(torch.float64), qs, interpolation="linear")
    return {f"q{int(q * 100)}": float(v) for q, v in zip(qs.tolist(), vals.tolist(), strict=True)}
