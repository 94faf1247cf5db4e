"""Selection and weighting (ALGORITHM.md §3) on hand-made score vectors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from worker.imu import select_and_weight


def test_only_negative_scores_are_candidates() -> None:
    scores = torch.tensor([0.5, 2.0, -0.25, 3.0, 0.0])
    idx, w, info = select_and_weight(scores, top_data=0.1)
    assert idx.tolist() == [2]  # the single negative one, k = max(1, floor(0.1 * 1)) = 1
    assert w.tolist() == [0.5]  # sqrt(0.25); a single weight is its own quantile
    assert info["candidates"] == 1 and info["kept"] == 1 and not info["fallback"]
    assert info["n"] == 5


def test_ranking_by_magnitude_and_k_rounding() -> None:
    scores = -torch.arange(1, 21, dtype=torch.float64)  # -1 .. -20, all candidates
    idx, _, info = select_and_weight(scores, top_data=0.1, clip_quantile=1.0)
    assert idx.tolist() == [19, 18]  # floor(0.1 * 20) = 2, largest |I| first
    idx, _, info = select_and_weight(scores, top_data=0.19, clip_quantile=1.0)
    assert info["kept"] == 3  # floor(3.8) = 3: floor, not round
    idx, _, info = select_and_weight(scores[:9], top_data=0.1, clip_quantile=1.0)
    assert info["kept"] == 1 and idx.tolist() == [8]  # floor(0.9) = 0 -> at least one
    idx, _, info = select_and_weight(scores, top_data=1.0, clip_quantile=1.0)
    assert info["kept"] == 20 and idx.tolist() == list(range(19, -1, -1))


def test_ties_keep_the_lower_index_first() -> None:
    scores = torch.tensor([-1.0, -4.0, 1.0, -4.0, -4.0, -1.0])
    idx, w, _ = select_and_weight(scores, top_data=0.6, clip_quantile=1.0)
    assert idx.tolist() == [1, 3, 4]  # floor(0.6 * 5) = 3, the three -4 in index order
    assert w.tolist() == [2.0, 2.0, 2.0]


def test_clip_at_quantile_with_linear_interpolation() -> None:
    # Kept |I| = 16, 9, 4, 1 -> raw weights 4, 3, 2, 1.
    scores = torch.tensor([-1.0, -16.0, -4.0, -9.0])
    idx, w, info = select_and_weight(scores, top_data=1.0, clip_quantile=0.5)
    assert idx.tolist() == [1, 3, 2, 0]
    # Median of [1, 2, 3, 4] with linear interpolation is 2.5.
    assert info["clip_value"] == pytest.approx(2.5)
    assert w.tolist() == pytest.approx([2.5, 2.5, 2.0, 1.0])
    _, w, info = select_and_weight(scores, top_data=1.0, clip_quantile=0.93)
    # Position 0.93 * 3 = 2.79 between 3 and 4 -> 3.79.
    assert info["clip_value"] == pytest.approx(3.79)
    assert w.tolist() == pytest.approx([3.79, 3.0, 2.0, 1.0])
    assert info["weight_max"] == pytest.approx(3.79) and info["weight_min"] == 1.0
    assert info["weight_median"] == pytest.approx(2.5)


def test_all_zero_scores_fall_back_to_equal_weights() -> None:
    idx, w, info = select_and_weight(torch.zeros(5))
    assert idx.tolist() == [0, 1, 2, 3, 4]
    assert w.tolist() == [1.0] * 5
    assert info["fallback"] is True and "no sample" in info["fallback_reason"]


def test_info_is_json_serialisable() -> None:
    _, _, info = select_and_weight(torch.randn(100, generator=torch.Generator().manual_seed(0)))
    again = json.loads(json.dumps(info))
    assert again["n"] == 100 and set(again["weight_quantiles"]) == {
        "q0",
        "q25",
        "q50",
        "q75",
        "q100",
    }
    assert math.isclose(again["weight_quantiles"]["q100"], info["weight_max"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"top_data": 0.0}, "top_data"),
        ({"top_data": 1.5}, "top_data"),
        ({"clip_quantile": 0.0}, "clip_quantile"),
        ({"clip_quantile": 2.0}, "clip_quantile"),
    ],
)
def test_bad_arguments(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        select_and_weight(torch.tensor([-1.0, 2.0]), **kwargs)


def test_non_finite_and_empty_scores_are_rejected() -> None:
    with pytest.raises(ValueError, match="not finite"):
        select_and_weight(torch.tensor([-1.0, float("nan")]))
    with pytest.raises(ValueError, match="no scores"):
        select_and_weight(torch.tensor([]))


def test_keep_all_weights_every_record() -> None:
    """Deletion requests under calibration: records with I >= 0 follow the candidates at
    the smallest kept weight, so none of the named records is left out of the ascent."""
    scores = torch.tensor([-4.0, 1.0, -1.0, 0.0, -9.0], dtype=torch.float64)
    idx, w, info = select_and_weight(scores, top_data=1.0, clip_quantile=1.0, keep_all=True)
    assert sorted(idx.tolist()) == [0, 1, 2, 3, 4]
    assert idx[:3].tolist() == [4, 0, 2]  # the candidates first, most influential first
    assert w.tolist() == [3.0, 2.0, 1.0, 1.0, 1.0]
    assert info["kept"] == 5 and info["candidates"] == 3 and info["keep_all"] is True
