"""A tiny end-to-end run of the paper comparison (digits, few epochs): structure and caching."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from bench import paper


@pytest.mark.slow
def test_quick_paper_run_produces_every_method_and_reuses_the_cache(tmp_path: Path) -> None:
    settings = replace(paper.preset("quick", "cnn"), n_train=300, n_test=100, member_probe_size=100)
    cache = tmp_path / "cache"
    result = paper.run_paper(settings, log=lambda _m: None, cache_dir=cache)

    assert result["meta"]["data"]["name"] == "sklearn-digits"
    assert result["meta"]["torch"] and result["meta"]["seeds"] == [0]
    seen = {(r["scenario"], r["method"]) for r in result["runs"]}
    expected = ("original", *paper.METHODS, *settings.variants)
    assert settings.variants and seen == {(s, m) for s in paper.SCENARIOS for m in expected}
    for run in result["runs"]:
        m = run["metrics"]
        assert all(0.0 <= m[k] <= 100.0 for k in ("ua", "ra", "ta", "mia"))
        assert math.isfinite(m["avg_gap"])
        assert run["times"]["evaluate_s"] > 0
        if run["method"] == "retrain":
            assert m["avg_gap"] == 0.0 and run["times"]["train_s"] > 0
        elif run["method"] != "original":
            assert run["times"]["unlearn_s"] > 0
    # The variant really ran with its override.
    variant = next(r for r in result["runs"] if r["method"] == settings.variants[0])
    assert variant["stats"]["config"]["lr"] == 0.001
    # A model retrained without the forgotten class never predicts it.
    retrain = next(
        r for r in result["runs"] if r["scenario"] == "classwise" and r["method"] == "retrain"
    )
    assert retrain["metrics"]["ua"] == 100.0
    n_forget = {r["scenario"]: r["n_forget"] for r in result["runs"]}
    assert n_forget["random"] == round(0.1 * 300)
    # Three trained models (base + two retrains) cached as safetensors, reused on a rerun.
    assert len(list(cache.glob("*.safetensors"))) == 3
    again = paper.run_paper(settings, log=lambda _m: None, cache_dir=cache)
    assert all(v["cached"] for v in again["meta"]["base_models"].values())
    assert [r["metrics"]["ua"] for r in again["runs"]] == [
        r["metrics"]["ua"] for r in result["runs"]
    ]
