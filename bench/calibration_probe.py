"""Default requests on models nothing was tuned on: where calibrated forgetting is released.

    python -m bench.calibration_probe [--out bench/results/calibration_probe.json]

Trains Fashion-MNIST models the calibration was never tuned on (3000 training images, seeded)
and submits default-parameter requests through the functions the worker runs: IMU with its
defaults, the guard on one half of the eval set, metrics and the service's default release
policy on the other half. Scenarios: three class-wise requests and two random 300-record
requests per model.

Two eval sets: 2000 held-out images of Fashion-MNIST's training split (drawn like the training
records, as a team's own held-out split is) and 2000 of its test split (a slightly different
distribution). Random requests run against both, and each is also answered by retraining
from scratch without the forget set, judged by the same policy: the reference that says
whether "looks unseen" was reachable at all. Writes one JSON row per request: the policy's
decision and reasons, the controller's stop reason, steps and backtracks, forget accuracy,
loss AUC and the held-out drop on the policy half. Needs `apt-get install
dataset-fashion-mnist`; ~3 min on 2 CPUs.
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
# (label, architecture kwargs, epochs, lr): an MLP at 10 epochs and at 60 (it then fits every
# training image: the memorising case), and a longer-trained BatchNorm CNN.
MODELS = (
    ("mlp-784-256", {"arch": "mlp", "in_features": 784, "hidden": [256]}, 10, 1e-3),
    ("mlp-784-256-e60", {"arch": "mlp", "in_features": 784, "hidden": [256]}, 60, 1e-3),
    ("cnn-w16-bn", {"arch": "cnn", "in_channels": 1, "width": 16, "batch_norm": True}, 20, 3e-3),
)
CLASSES = {0: "T-shirt/top", 1: "Trouser", 7: "Sneaker"}
RANDOM_SEEDS = (1, 3)
N_TRAIN, N_EVAL = 3000, 2000
IN_DISTRIBUTION, SHIFTED = "train-split hold-out", "test split"


def _scenarios(y: torch.Tensor, eval_name: str) -> list[tuple[str, torch.Tensor, bool]]:
    out = []
    if eval_name == IN_DISTRIBUTION:
        out += [(f"class {c} ({name})", y == c, True) for c, name in CLASSES.items()]
    for seed in RANDOM_SEEDS:
        order = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(seed))
        out.append((f"random 300 (seed {seed})", order < 300, False))
    return out


def _flat(x: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) if spec["arch"] == "mlp" else x


def _train(spec: dict[str, Any], x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float):
    torch.manual_seed(0)
    model = build(str(spec["arch"]), **{k: v for k, v in spec.items() if k != "arch"})
    fit(model, x, y, epochs=epochs, lr=lr, seed=0, device="cpu")
    return model.eval()


def _judge(before: dict[str, Any], after: dict[str, Any], class_wise: bool) -> dict[str, Any]:
    return decide(effective_policy(Settings(), None), before, after, class_wise=class_wise)


def run(out: Path) -> dict[str, Any]:
    folder = find_fashion_mnist()
    if folder is None:
        raise SystemExit("Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
    torch.set_num_threads(1)
    data = load_fashion_mnist(folder, n_train=N_TRAIN + N_EVAL, n_test=N_EVAL, seed=0)
    perm = torch.randperm(N_TRAIN + N_EVAL, generator=torch.Generator().manual_seed(0))
    train_idx, held_idx = perm[:N_TRAIN], perm[N_TRAIN:]
    x_all, y_train = data.x_train[train_idx], data.y_train[train_idx]
    evals = {
        IN_DISTRIBUTION: (data.x_train[held_idx], data.y_train[held_idx]),
        SHIFTED: (data.x_test, data.y_test),
    }
    order = torch.randperm(N_EVAL, generator=torch.Generator().manual_seed(0))
    rows: list[dict[str, Any]] = []
    for label, spec, epochs, lr in MODELS:
        x = _flat(x_all, spec)
        t0 = time.perf_counter()
        base = _train(spec, x, y_train, epochs, lr)
        model_info = {
            "model": label,
            "train_acc": accuracy(base, x, y_train),
            "train_s": round(time.perf_counter() - t0, 1),
        }
        retrained: dict[str, Any] = {}  # random scenario -> model retrained without it
        for eval_name, (xe_raw, ye) in evals.items():
            xe = _flat(xe_raw, spec)
            guard = (xe[order[::2]], ye[order[::2]])
            policy_half = (xe[order[1::2]], ye[order[1::2]])
            eval_info = {"eval": eval_name, "test_acc": accuracy(base, xe, ye)}
            for name, mask, class_wise in _scenarios(y_train, eval_name):
                model = copy.deepcopy(base)
                forget = (x[mask], y_train[mask])
                kw = {"eval_pair": policy_half, "member_probe": None, "class_wise": class_wise}
                before = job_metrics(model, forget=forget, **kw)
                t1 = time.perf_counter()
                result = unlearn(
                    model, *forget, IMUConfig(device="cpu"), heldout=guard, class_wise=class_wise
                )
                seconds = time.perf_counter() - t1
                after = job_metrics(model, forget=forget, **kw)
                verdict = _judge(before, after, class_wise)
                cal = result.stats["calibration"]
                held = "eval_acc_retained_classes" if class_wise else "eval_acc"
                row: dict[str, Any] = {
                    **model_info,
                    **eval_info,
                    "scenario": name,
                    "n_forget": int(mask.sum()),
                    "decision": verdict["decision"],
                    "reasons": verdict["reasons"],
                    "stop": cal["reason"],
                    "steps": cal["steps"],
                    "backtracks": cal["backtracks"],
                    "forget_acc": [before["forget_acc"], after["forget_acc"]],
                    "forget_loss_auc": [
                        before.get("forget_loss_auc"),
                        after.get("forget_loss_auc"),
                    ],
                    "auc_limit": after.get("forget_loss_auc_limit"),
                    "heldout_drop": round(before[held] - after[held], 4),
                    "unlearn_s": round(seconds, 2),
                }
                if not class_wise:
                    if name not in retrained:
                        retrained[name] = _train(spec, x[~mask], y_train[~mask], epochs, lr)
                    ref = job_metrics(retrained[name], forget=forget, **kw)
                    ref_verdict = _judge(before, ref, class_wise)
                    row["retrain"] = {
                        "decision": ref_verdict["decision"],
                        "forget_loss_auc": ref.get("forget_loss_auc"),
                        "heldout_drop": round(before[held] - ref[held], 4),
                    }
                rows.append(row)
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
    rows = doc["rows"]
    refs = [r["retrain"] for r in rows if "retrain" in r]
    lines = [
        "## Default requests on untuned models (`bench/calibration_probe.py`)",
        "",
        f"{doc['released']} of {doc['requests']} default-parameter requests released. Models "
        "trained on 3000 Fashion-MNIST images; guard on one half of the eval set, metrics and "
        "the default release policy on the other half. Held results are `candidate` versions. "
        "Eval sets: 2000 held-out images of the training split (drawn like the training "
        "records) or 2000 of the test split (a slightly different distribution). Random "
        "requests are also answered by retraining without the forget set, judged by the same "
        f"policy: {sum(r['decision'] == 'active' for r in refs)} of {len(refs)} retrained "
        "models pass.",
        "",
        "| Model (train / eval acc) | Eval set | Request | Policy | Stop (steps, backtracks) "
        "| Forget acc | Loss AUC (limit) | Held-out drop | Retrained: AUC, policy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        auc = r["forget_loss_auc"][1]
        auc_cell = "-" if auc is None else f"{auc:.3f} ({r['auc_limit']:.3f})"
        verdict = "released" if r["decision"] == "active" else "held: " + "; ".join(r["reasons"])
        ref = r.get("retrain")
        ref_cell = "-"
        if ref is not None:
            passed = "passes" if ref["decision"] == "active" else "held"
            ref_cell = f"{ref['forget_loss_auc']:.3f}, {passed}"
        lines.append(
            f"| {r['model']} ({r['train_acc']:.2f} / {r['test_acc']:.2f}) | {r['eval']} "
            f"| {r['scenario']} | {verdict} "
            f"| {r['stop']} ({r['steps']}, {r['backtracks']}) "
            f"| {r['forget_acc'][0]:.2f} → {r['forget_acc'][1]:.2f} "
            f"| {auc_cell} "
            f"| {r['heldout_drop']:+.3f} | {ref_cell} |"
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
