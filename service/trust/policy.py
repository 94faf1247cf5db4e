"""Release policy: does a new version become `active` at once, or wait as a `candidate`?

Thresholds come from settings (LETHE_POLICY_*) and may be overridden per request through
`params.policy`, each within [0, 1] (checked at submission by
`service.domain.params.PolicyOverrides`). The checks judge the policy half of the eval set, which
the calibration never saw (worker/heldout.py):

- `eval_acc_drop` = eval accuracy before − after ≤ `max_eval_acc_drop` (utility kept); for a
  class-wise forget set, on the eval records of the remaining classes;
- forgetting achieved, by the kind of forget set (`mode`; `auto` decides from the data):
  - `class` (the forget set holds every remaining training record of its classes):
    forget accuracy after ≤ `max_forget_acc`;
  - `random` (anything else): the forgotten records look unseen — the AUC of per-sample
    loss, forget vs held-out, ≤ 0.5 + 2·SE (+ `max_forget_auc_excess`). A fixed MIA threshold
    would fail retraining itself on a memorising model; this test asks what retraining gives.
- `require_review: true` always holds the result for a human decision.

It fails safe: a check that could not run (no eval dataset, an empty set) is not a pass.
The result is then held as a candidate, and `reasons` names what evidence was missing.
"""

from __future__ import annotations

import math
from typing import Any

from service.domain.states import VersionStatus
from service.settings import Settings

MODES = ("auto", "class", "random")
CLASSIFIER_THRESHOLDS = ("max_eval_acc_drop", "max_forget_acc", "max_forget_auc_excess")
# Causal LMs (service/trust/lm_policy.py); the AUC excess is shared.
LM_THRESHOLDS = (
    "max_forget_recall", "max_heldout_ppl_rise", "max_probe_recall_drop", "max_forget_auc_excess",
)  # fmt: skip
THRESHOLDS = (*CLASSIFIER_THRESHOLDS, *LM_THRESHOLDS[:3])


def effective_policy(settings: Settings, overrides: dict[str, Any] | None) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "max_eval_acc_drop": settings.policy_max_eval_acc_drop,
        "max_forget_acc": settings.policy_max_forget_acc,
        "max_forget_auc_excess": settings.policy_max_forget_auc_excess,
        "max_forget_recall": settings.policy_max_forget_recall,
        "max_heldout_ppl_rise": settings.policy_max_heldout_ppl_rise,
        "max_probe_recall_drop": settings.policy_max_probe_recall_drop,
        "mode": "auto",
        "require_review": False,
    }
    policy.update(overrides or {})
    return policy


def check(
    name: str, value: float | None, limit: float, why_missing: str, **extra: Any
) -> dict[str, Any]:
    """One check: ok is None (fails safe) when the value is missing or not finite."""
    out: dict[str, Any] = {"name": name, "limit": limit, **extra}
    if value is None or not math.isfinite(value):
        return {**out, "value": None, "ok": None, "note": why_missing}
    return {**out, "value": round(value, 6), "ok": value <= limit}


def decide(
    policy: dict[str, Any],
    before: dict[str, Any],
    after: dict[str, Any],
    *,
    class_wise: bool,
) -> dict[str, Any]:
    """The decision (`active` | `candidate`) with every check's value, limit and outcome."""
    mode = policy["mode"] if policy["mode"] != "auto" else ("class" if class_wise else "random")
    checks = []
    # Class-wise forgetting is meant to lose the forgotten classes: judge the others.
    metric = "eval_acc"
    if mode == "class" and all(
        m.get("eval_acc_retained_classes") is not None for m in (before, after)
    ):
        metric = "eval_acc_retained_classes"
    drop = None
    if before.get(metric) is not None and after.get(metric) is not None:
        drop = float(before[metric]) - float(after[metric])
    checks.append(
        check("eval_acc_drop", drop, policy["max_eval_acc_drop"], "no eval dataset", metric=metric)
    )
    if mode == "class":
        forget_acc = after.get("forget_acc")
        checks.append(
            check(
                "forget_acc",
                None if forget_acc is None else float(forget_acc),
                policy["max_forget_acc"],
                "no forget accuracy",
            )
        )
    else:
        auc, limit = after.get("forget_loss_auc"), after.get("forget_loss_auc_limit")
        checks.append(
            check(
                "forget_indistinguishable",
                None if auc is None or limit is None else float(auc) - float(limit),
                policy["max_forget_auc_excess"],
                "no eval dataset to compare the forgotten records with",
                metric="forget_loss_auc - forget_loss_auc_limit",
                auc=auc,
                auc_limit=limit,
            )
        )
    return verdict(
        checks, policy, mode=mode, class_wise=class_wise, thresholds=CLASSIFIER_THRESHOLDS
    )


def verdict(
    checks: list[dict[str, Any]],
    policy: dict[str, Any],
    *,
    mode: str,
    class_wise: bool,
    thresholds: tuple[str, ...],
) -> dict[str, Any]:
    """The decision from the checks: any check that failed or could not run holds the
    result (fails safe), as does a request that asked for review. Shared by the LM policy."""
    failed = [c["name"] for c in checks if c["ok"] is not True]
    reasons = [
        f"{c['name']}: {c['value']} > {c['limit']}" if c["ok"] is False
        else f"{c['name']}: not measured ({c['note']})"
        for c in checks if c["ok"] is not True
    ]  # fmt: skip
    if policy.get("require_review"):
        failed.append("require_review")
        reasons.append("require_review: the request asked for a human decision")
    return {
        "decision": VersionStatus.CANDIDATE if failed else VersionStatus.ACTIVE,
        "mode": mode,
        "class_wise": class_wise,
        "thresholds": {k: policy[k] for k in thresholds},
        "require_review": bool(policy.get("require_review")),
        "checks": checks,
        "failed": failed,
        "reasons": reasons,
    }
