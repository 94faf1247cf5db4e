"""The report generator turns results JSON into tables, a backbone decision and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.metrics import add_gaps, avg_gap, headline
from bench.report import build_report, decide_backbone

# Per method: (forget_acc, retain_acc, test_acc, mia) as fractions, for two seeds.
SYNTHETIC = {
    "classwise": {
        "original": [(0.95, 0.96, 0.90, 0.05), (0.93, 0.95, 0.89, 0.07)],
        "retrain": [(0.0, 0.97, 0.91, 1.0), (0.0, 0.96, 0.90, 1.0)],
        "ga": [(0.10, 0.70, 0.65, 0.90), (0.14, 0.72, 0.66, 0.88)],
        "imu_train": [(0.05, 0.90, 0.86, 0.95), (0.06, 0.91, 0.85, 0.94)],
        "imu_eval": [(0.02, 0.95, 0.89, 0.99), (0.03, 0.94, 0.88, 0.98)],
        "imu_train@lr=0.001": [(0.50, 0.95, 0.89, 0.50), (0.50, 0.95, 0.89, 0.50)],
        "imu_eval@lr=0.001": [(0.40, 0.95, 0.89, 0.60), (0.40, 0.95, 0.89, 0.60)],
    },
    "random": {
        "original": [(0.96, 0.96, 0.88, 0.04), (0.97, 0.96, 0.88, 0.05)],
        "retrain": [(0.88, 0.96, 0.88, 0.12), (0.89, 0.96, 0.88, 0.11)],
        "ga": [(0.50, 0.60, 0.58, 0.50), (0.55, 0.62, 0.60, 0.45)],
        "imu_train": [(0.80, 0.93, 0.85, 0.20), (0.82, 0.92, 0.86, 0.18)],
        "imu_eval": [(0.86, 0.95, 0.87, 0.14), (0.87, 0.95, 0.87, 0.13)],
    },
}


def _paper(arch: str) -> dict:
    runs = []
    for scenario, methods in SYNTHETIC.items():
        for method, per_seed in methods.items():
            for seed, (f, r, t, m) in enumerate(per_seed):
                run = {
                    "scenario": scenario,
                    "seed": seed,
                    "method": method,
                    "metrics": headline(f, r, t, m),
                    "n_forget": 100,
                    "times": {},
                }
                run["times"]["train_s" if method == "retrain" else "unlearn_s"] = 1.5 + seed
                runs.append(run)
    add_gaps(runs)
    return {
        "kind": "paper",
        "arch": arch,
        "meta": {
            "torch": "x",
            "device": "cpu",
            "seeds": [0, 1],
            "created": "now",
            "data": {
                "name": "synthetic",
                "source": "test",
                "n_train": 1000,
                "n_test": 200,
                "classes": [str(i) for i in range(10)],
            },
            "settings": {
                "forget_class": 0,
                "train": {"epochs": 1, "lr": 0.1, "batch_size": 8},
                "ga": {"epochs": 5, "lr": 0.001, "batch_size": 256},
            },
        },
        "runs": runs,
    }


SPEED = {
    "device": "cpu",
    "torch": "x",
    "results": [
        {"model": "cnn", "method": m, "n": n, "seconds": s * n / 256}
        for m, s in (("loop", 2.0), ("closed_form", 0.02), ("forward", 0.016))
        for n in (256, 1024, 4096)
    ],
}


def test_avg_gap_is_mean_absolute_difference() -> None:
    gold = headline(0.0, 0.97, 0.91, 1.0)
    method = headline(0.10, 0.70, 0.65, 0.90)
    # |90-100| + |70-97| + |65-91| + |90-100| = 10 + 27 + 26 + 10 = 73 -> 18.25
    assert avg_gap(method, gold) == pytest.approx(18.25)
    runs = [
        {"scenario": "c", "seed": 0, "method": "retrain", "metrics": gold},
        {"scenario": "c", "seed": 0, "method": "ga", "metrics": dict(method)},
        {"scenario": "c", "seed": 1, "method": "ga", "metrics": dict(method)},
    ]
    add_gaps(runs)
    assert runs[1]["metrics"]["avg_gap"] == pytest.approx(18.25)
    assert runs[1]["metrics"]["gap_no_mia"] == pytest.approx(63 / 3)  # 10 + 27 + 26
    assert "avg_gap" not in runs[2]["metrics"]  # no retrain run for seed 1


def test_report_builds_tables_decision_and_plots(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "paper_cnn.json").write_text(json.dumps(_paper("cnn")))
    (results / "influence_speed.json").write_text(json.dumps(SPEED))
    out = tmp_path / "RESULTS.md"

    decision = build_report(results, out)

    text = out.read_text()
    assert "| Method | UA ↑ | RA ↑ | TA ↑ | MIA | Avg. Gap ↓ | Time (s) |" in text
    # Class-wise GA: mean over seeds of per-seed gaps (73/4 = 18.25 and 74/4 = 18.5).
    assert "| Gradient ascent (GA) | 88.00 ± 2.83 | 71.00 ± 1.41 | 65.50 ± 0.71 |" in text
    assert "| 18.38 ± 0.18 |" in text
    # eval mode is closer to retraining in every cell of the synthetic data.
    assert decision["choice"] == "eval"
    assert decision["mean_gap_eval"] < decision["mean_gap_train"]
    assert '**Decision: `backbone_mode="eval"`**' in text
    # Variant runs are labelled with their override and paired by mode in the decision.
    assert "| IMU, backbone `eval`, lr 0.001 |" in text
    assert len(decision["cells"]) == 3 and decision["n_deciding"] == 3
    assert decision["per_variant"]["lr 0.001"]["n"] == 1
    assert decision["best_variant"] == {"train": "engine defaults", "eval": "engine defaults"}
    # Mean Avg. Gap per scenario and overall, relative to GA's: GA's random-forgetting gaps
    # are 142/4 = 35.5 and 130/4 = 32.5, so 34.0; overall (18.375 + 34) / 2.
    assert "| Gradient ascent (GA) | 18.38 (1.00×) | 34.00 (1.00×) | 26.19 (1.00×) |" in text
    assert "## Summary" in text and "mean Avg. Gap" in text
    assert "Without the MIA term" in text and "agrees with the decision" in text
    # Speed table and ratio at the largest n: 2.0 / 0.02 = 100x.
    assert "n = 4096" in text and "100.0× faster than the per-sample loop (`loop`)" in text
    assert "closed form 100.0× faster than the authors' per-sample loop" in text
    assert "1.25× one batched forward pass" in text
    for png in ("forget_vs_test.png", "influence_time_vs_n.png"):
        assert f"]({results.name}/{png})" in text
        data = (results / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_backbone_decision_compares_each_mode_at_its_best_step_size() -> None:
    def summary(gap_train: float, gap_eval: float, eval_small_lr: float = 99.0) -> dict:
        return {
            ("s", "imu_train"): {"metrics.avg_gap": (gap_train, 0.0)},
            ("s", "imu_eval"): {"metrics.avg_gap": (gap_eval, 0.0)},
            ("s", "imu_train@lr=0.001"): {"metrics.avg_gap": (50.0, 0.0)},
            ("s", "imu_eval@lr=0.001"): {"metrics.avg_gap": (eval_small_lr, 0.0)},
        }

    assert decide_backbone({"a": summary(1.0, 5.0)})["choice"] == "train"
    assert decide_backbone({"a": summary(4.6, 5.0)})["choice"] == "eval"  # tie -> cheaper
    # At equal step size train wins (3 < 5), but eval at its own best step size wins.
    best = decide_backbone({"a": summary(3.0, 5.0, eval_small_lr=0.5)})
    assert best["choice"] == "eval" and best["best_variant"]["eval"] == "lr 0.001"
    assert decide_backbone({})["choice"] is None
