"""The LM engine on the memorisation fixture (tests/engine/lm_fixture.py): IMU and GA with the
ascent loss and the NPO loss, default settings, then the same with the guards switched off.
Prints one JSON object per run. A first measurement, not yet part of run_all.

    PYTHONPATH=. .venv/bin/python -m bench.lm_fixture_runs
"""

from __future__ import annotations

import copy
import json
import time

import torch

from tests.engine.lm_fixture import train_fixture
from worker.imu.lm_unlearn import LMUnlearnConfig, unlearn_lm
from worker.imu.text_metrics import evaluate_lm

RUNS: list[dict] = [
    {"method": "imu", "loss": "ga"},
    {"method": "imu", "loss": "npo"},
    {"method": "ga", "loss": "ga"},
    {"method": "ga", "loss": "npo"},
    {"method": "imu", "loss": "ga", "ppl_max_rise": 100.0, "guard_max_drop": 1.0},
    {"method": "imu", "loss": "npo", "ppl_max_rise": 100.0, "guard_max_drop": 1.0},
]


def _row(fx, model) -> dict:
    ev = evaluate_lm(model, fx.forget, fx.heldout, fx.retain)
    return {
        "forget_recall": ev["forget"]["exact_recall"],
        "retain_recall": ev["member_probe"]["exact_recall"],
        "heldout_ppl": round(ev["heldout"]["perplexity"], 3),
        "forget_nll": round(ev["forget"]["nll"], 4),
        "min_k_auc": round(ev["attacks"]["min_k_auc"], 4),
    }


def main() -> None:
    torch.set_num_threads(1)
    fx = train_fixture()
    print(json.dumps({"run": "before", "train_cpu_s": round(fx.train_seconds, 1),
                      "epochs": fx.epochs, **_row(fx, fx.model)}))  # fmt: skip
    for kw in RUNS:
        model = copy.deepcopy(fx.model)
        start = time.process_time()
        res = unlearn_lm(model, fx.forget, fx.heldout, fx.retain, LMUnlearnConfig(**kw))
        cal = res.stats["calibration"]
        print(json.dumps({
            "run": kw, "reason": cal["reason"], "steps": cal["steps"],
            "backtracks": cal["backtracks"], "cpu_s": round(time.process_time() - start, 1),
            **_row(fx, model),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
