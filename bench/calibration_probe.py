"""Default requests on models nothing was tuned on: where calibrated forgetting is released.

    python -m bench.calibration_probe [--out bench/results/calibration_probe.json]

Trains Fashion-MNIST models the calibration was never tuned on (3000 training images, seeded)
and submits default-parameter requests through the functions the worker runs: IMU with its
defaults, the guard on one half of the test set, metrics and the service's default release
policy on the other half. Scenarios: three class-wise requests and two random 300-record
requests per model. Writes one JSON row per request: the policy's decision and reasons, the
controller's stop reason, steps and backtracks, forget accuracy, loss AUC and the held-out
drop on the policy half. Needs `apt-get install dataset-fashion-mnist`; ~3 min on 2 CPUs.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.data import find_fashion_mnist, load_fashion_mnist
from service.settings import Settings
from service.trust.policy import decide, effective_policy
from worker.imu import IMUConfig, unlearn
from worker.imu.architectures import build
from worker.imu.train import accuracy, fit
from worker.job_metrics import job_metrics

RESULTS = Path(__file__).resolve().parent / "results"
# (label, architecture kwargs, epochs, lr): a memorising MLP and a longer-trained BN CNN.
MODELS = (
    ("mlp-784-256", {"arch": "mlp", "in_features": 784, "hidden": [256]}, 10, 1e-3),
    ("cnn-w16-bn", {"arch": "cnn", "in_channels": 1, "width": 16, "batch_norm": True}, 20, 3e-3),
)
CLASSES = {0: "T-shirt/top", 1: "Trouser", 7: "Sneaker"}
RANDOM_SEEDS = (1, 3)


def _scenarios(y: torch.Tensor) -> list[tuple[str, torch.Tensor, bool]]:
    out = [(f"class {c} ({name})", y == c, True) for c, name in CLASSES.items()]
    for seed in RANDOM_SEEDS:
        order = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(seed))
        out.append((f"random 300 (seed {seed})", order < 300, False))
    return out


def run(out: Path) -> dict[str, Any]:
    folder = find_fashion_mnist()
    if folder is None:
        raise SystemExit("Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
    torch.set_num_threads(1)
    data = load_fashion_mnist(folder, n_train=3000, n_test=2000, seed=0)
    order = torch.randperm(data.x_test.shape[0], generator=torch.Generator().manual_seed(0))
    rows: list[dict[str, Any]] = []
    for label, spec, epochs, lr in MODELS:
        kwargs = {k: v for k, v in spec.items() if k != "arch"}
        flat = spec["arch"] == "mlp"
        x = data.x_train.reshape(data.x_train.shape[0], -1) if flat else data.x_train
        xt = data.x_test.reshape(data.x_test.shape[0], -1) if flat else data.x_test
        torch.manual_seed(0)
        base = build(str(spec["arch"]), **kwargs)
        t0 = time.perf_counter()
        fit(base, x, data.y_train, epochs=epochs, lr=lr, seed=0, device="cpu")
        base.eval()
        model_info = {
            "model": label,
            "train_acc": accuracy(base, x, data.y_train),
            "test_acc": accuracy(base, xt, data.y_test),
            "train_s": round(time.perf_counter() - t0, 1),
        }
        guard = (xt[order[::2]], data.y_test[order[::2]])
        policy_half = (xt[order[1::2]], data.y_test[order[1::2]])
        for name, mask, class_wise in _scenarios(data.y_train):
            model = copy.deepcopy(base)
            forget = (x[mask], data.y_train[mask])
            kw = {"eval_pair": policy_half, "member_probe": None, "class_wise": class_wise}
            before = job_metrics(model, forget=forget, **kw)
            t1 = time.perf_counter()
            result = unlearn(model, *forget, IMUConfig(device="cpu"), heldout=guard,
                             class_wise=class_wise)  # fmt: skip
            seconds = time.perf_counter() - t1
            after = job_metrics(model, forget=forget, **kw)
            verdict = decide(effective_policy(Settings(), None), before, after,
                             class_wise=class_wise)  # fmt: skip
            cal = result.stats["calibration"]
            held = "eval_acc_retained_classes" if class_wise else "eval_acc"
            rows.append({
                **model_info, "scenario": name, "n_forget": int(mask.sum()),
                "decision": verdict["decision"], "reasons": verdict["reasons"],
                "stop": cal["reason"], "steps": cal["steps"], "backtracks": cal["backtracks"],
                "forget_acc": [before["forget_acc"], after["forget_acc"]],
                "forget_loss_auc": [before.get("forget_loss_auc"), after.get("forget_loss_auc")],
                "auc_limit": after.get("forget_loss_auc_limit"),
                "heldout_drop": round(before[held] - after[held], 4),
                "unlearn_s": round(seconds, 2),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    doc = {
        "benchmark": "calibration_probe",
        "created_at": datetime.now(UTC).isoformat(),
        "torch": torch.__version__,
        "released": sum(r["decision"] == "active" for r in rows),
        "requests": len(rows),
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def section(results_dir: Path) -> list[str]:
    """RESULTS.md lines for the probe's JSON in ``results_dir`` (none when it is absent)."""
    path = results_dir / "calibration_probe.json"
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    lines = [
        "## Default requests on untuned models (`bench/calibration_probe.py`)",
        "",
        f"{doc['released']} of {doc['requests']} default-parameter requests released. Models "
        "trained on 3000 Fashion-MNIST images; guard on one half of the test set, metrics and "
        "the default release policy on the other half. Held results are `candidate` versions.",
        "",
        "| Model (train / test acc) | Request | Policy | Stop (steps, backtracks) "
        "| Forget acc | Loss AUC (limit) | Held-out drop |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        auc = r["forget_loss_auc"][1]
        auc_cell = "-" if auc is None else f"{auc:.3f} ({r['auc_limit']:.3f})"
        verdict = "released" if r["decision"] == "active" else "held: " + "; ".join(r["reasons"])
        lines.append(
            f"| {r['model']} ({r['train_acc']:.2f} / {r['test_acc']:.2f}) | {r['scenario']} "
            f"| {verdict} "
            f"| {r['stop']} ({r['steps']}, {r['backtracks']}) "
            f"| {r['forget_acc'][0]:.2f} → {r['forget_acc'][1]:.2f} "
            f"| {auc_cell} "
            f"| {r['heldout_drop']:+.3f} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "calibration_probe.json")
    args = parser.parse_args()
    doc = run(args.out)
    print(f"released {doc['released']} of {doc['requests']} default requests -> {args.out}")


if __name__ == "__main__":
    main()
