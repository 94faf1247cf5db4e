"""The paper's unlearning metrics on plain dicts (no torch), shared by paper.py and report.py.

All four headline numbers are percentages, as in the paper's tables:
UA = 100·(1 − forget accuracy), RA = retain accuracy, TA = test accuracy, MIA = MIA efficacy.
Avg. Gap = mean over those four of |method − retrain|, computed per seed against the
retrain run of the same seed, then averaged over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

GAP_KEYS = ("ua", "ra", "ta", "mia")
NO_MIA_KEYS = ("ua", "ra", "ta")
GOLD_METHOD = "retrain"


def headline(forget_acc: float, retain_acc: float, test_acc: float, mia: float) -> dict:
    """Fractions in [0, 1] -> the four headline percentages."""
    return {
        "ua": 100.0 * (1.0 - forget_acc),
        "ra": 100.0 * retain_acc,
        "ta": 100.0 * test_acc,
        "mia": 100.0 * mia,
    }


def avg_gap(method: dict, gold: dict, keys: Sequence[str] = GAP_KEYS) -> float:
    return sum(abs(method[k] - gold[k]) for k in keys) / len(keys)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var)


def add_gaps(runs: list[dict]) -> None:
    """Set run['metrics']['avg_gap'] for every run that has a retrain run of the same seed."""
    gold = {(r["scenario"], r["seed"]): r["metrics"] for r in runs if r["method"] == GOLD_METHOD}
    for run in runs:
        ref = gold.get((run["scenario"], run["seed"]))
        if ref is not None:
            run["metrics"]["avg_gap"] = avg_gap(run["metrics"], ref)
            # Without MIA: on models that barely overfit the attack is close to chance and
            # its efficacy swings by tens of points between seeds; this shows what remains.
            run["metrics"]["gap_no_mia"] = avg_gap(run["metrics"], ref, NO_MIA_KEYS)


def summarise(runs: Iterable[dict], keys: Sequence[str]) -> list[dict]:
    """One row per (scenario, method), in first-seen order: mean, std and seed count per key."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["scenario"], run["method"]), []).append(run)
    rows = []
    for (scenario, method), members in groups.items():
        row: dict = {"scenario": scenario, "method": method, "n_seeds": len(members)}
        for key in keys:
            values = [_lookup(m, key) for m in members]
            values = [v for v in values if v is not None]
            row[key] = mean_std(values) if values else None
        rows.append(row)
    return rows


def _lookup(run: dict, key: str) -> float | None:
    """'metrics.ua' style dotted paths into a run dict."""
    node: object = run
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, int | float) else None


def parse_method(method: str) -> tuple[str, dict]:
    """'imu_eval@lr=0.001' -> ('imu_eval', {'lr': 0.001}); plain names have no overrides.
    Values are ints, floats or (``backbone_mode=eval``) strings."""
    name, _, rest = method.partition("@")
    overrides: dict = {}
    for part in filter(None, rest.split(",")):
        key, _, value = part.partition("=")
        try:
            overrides[key] = int(value) if value.isdigit() else float(value)
        except ValueError:
            overrides[key] = value
    return name, overrides
