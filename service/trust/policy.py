"""Release policy: does a new version become `active` at once, or wait as a `candidate`?

Thresholds come from settings (LETHE_POLICY_*) and may be overridden per request through
`params.policy`, each within [0, 1] (checked at submission by
`service.domain.params.PolicyOverrides`). The checks judge the policy half of the eval set, which
the calibration never saw (worker/heldout.py):

- `eval_acc_drop` = eval accuracy before − after ≤ `max_eval_acc_drop` (utility kept); for a
  class-wise forget set, on the eval records of the remaining classes;
- `membership`, for every kind of request: the per-record membership test
  (worker/imu/membership.py, ALGORITHM.md §6) on the model after — the records sit inside
  the non-member band and either a set the model still remembered would score that low with
  probability ≤ `max_false_release_rate` (`forgotten`), or the model shows no membership
  signal at all (`no-membership-signal`: members and non-members closer than
  `max_membership_advantage`; an unchanged model is then an honest answer). Otherwise held,
  with the reason: `not-forgotten-within-guard` (the calibration stopped at the utility
  guard or its budget), `insufficient-evidence`, `over-forgotten`, `remembered`;
- `class` requests (the forget set holds every remaining training record of its classes)
  also need forget accuracy after ≤ `max_forget_acc`;
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
CLASSIFIER_THRESHOLDS = (
    "max_eval_acc_drop",
    "max_forget_acc",
    "max_false_release_rate",
    "max_membership_advantage",
    "membership_band",
)
# Causal LMs (service/trust/lm_policy.py); the AUC excess is shared.
LM_THRESHOLDS = (
    "max_forget_recall",
    "max_heldout_ppl_rise",
    "max_probe_recall_drop",
    "max_forget_auc_excess",
)
THRESHOLDS = (*CLASSIFIER_THRESHOLDS, *LM_THRESHOLDS)


def effective_policy(settings: Settings, overrides: dict[str, Any] | None) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "max_eval_acc_drop": settings.policy_max_eval_acc_drop,
        "max_forget_acc": settings.policy_max_forget_acc,
        "max_forget_auc_excess": settings.policy_max_forget_auc_excess,
        "max_false_release_rate": settings.policy_max_false_release_rate,
        "max_membership_advantage": settings.policy_max_membership_advantage,
        "membership_band": settings.policy_membership_band,
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
    stopped: str | None = None,
    exact: bool = False,
) -> dict[str, Any]:
    """The decision (`active` | `candidate`) with every check's value, limit and outcome;
    ``stopped`` is the calibration's stop reason (it names why evidence is missing)."""
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
    checks.append(membership_check(after.get("membership"), stopped, exact=exact))
    if after.get("membership_parts") is not None:
        checks.append(parts_check(after["membership_parts"], stopped, exact=exact))
    return verdict(
        checks, policy, mode=mode, class_wise=class_wise, thresholds=CLASSIFIER_THRESHOLDS
    )


# Why a calibration stopped short of its target, as a release reason.
_STOPPED_SHORT = ("guard-exhausted", "budget-exhausted", "overshoot-exhausted", "zero-gradient")


def membership_check(
    evidence: dict[str, Any] | None, stopped: str | None, *, exact: bool = False
) -> dict[str, Any]:
    """The membership test's outcome as a check: ok only for an outcome that releases. An
    exact answer (retrained without the records) needs no evidence: it is reported."""
    out: dict[str, Any] = {"name": "membership", "metric": "per-record membership test"}
    if exact:
        ev = evidence if isinstance(evidence, dict) else {}
        return {
            **out,
            "value": ev.get("statistic"),
            "limit": ev.get("limit"),
            "ok": True,
            "outcome": ev.get("outcome"),
            "reason": None,
            "exact": True,
            "note": "exact: retrained without the records; the evidence is reported, not required",
            "evidence": {k: v for k, v in ev.items() if k != "per_record_z"} or None,
        }
    if not isinstance(evidence, dict) or "outcome" not in evidence:
        note = "no eval dataset or no retained records to compare the records with"
        return {**out, "value": None, "limit": None, "ok": None, "note": note}
    outcome = str(evidence["outcome"])
    ok = bool(evidence.get("releases"))
    reason = outcome
    if not ok and outcome in ("remembered", "insufficient-evidence") and stopped in _STOPPED_SHORT:
        reason = "not-forgotten-within-guard"
    return {
        **out,
        "value": evidence.get("statistic"),
        "limit": evidence.get("limit"),
        "ok": ok,
        "outcome": outcome,
        "reason": None if ok else reason,
        "evidence": {k: v for k, v in evidence.items() if k != "per_record_z"},
    }


def parts_check(
    parts: list[dict[str, Any] | None], stopped: str | None, *, exact: bool = False
) -> dict[str, Any]:
    """A coalesced run (one run over several requests' records): each request's records are
    judged on their own too, so one request still remembered holds the run (and escalates
    it) even when the union looks forgotten."""
    judged = [membership_check(p, stopped, exact=exact) for p in parts]
    held = [c for c in judged if c["ok"] is not True]
    return {
        "name": "membership_per_request",
        "metric": "requests whose own records fail the test",
        "value": len(held),
        "limit": 0,
        "ok": not held,
        "requests": len(parts),
        "reason": held[0].get("reason") or "membership-not-measured" if held else None,
        "evidence": held[0].get("evidence") if held else None,
    }


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
    reasons = [_reason(c) for c in checks if c["ok"] is not True]
    if policy.get("require_review"):
        failed.append("require_review")
        reasons.append("require_review: the request asked for a human decision")
    return {
        "decision": VersionStatus.CANDIDATE if failed else VersionStatus.ACTIVE,
        "reason": _first_reason(checks, policy),
        "mode": mode,
        "class_wise": class_wise,
        "thresholds": {k: policy.get(k) for k in thresholds},
        "require_review": bool(policy.get("require_review")),
        "checks": checks,
        "failed": failed,
        "reasons": reasons,
    }


def _reason(c: dict[str, Any]) -> str:
    if c["ok"] is None:
        return f"{c['name']}: not measured ({c['note']})"
    if c.get("reason"):
        ev = c.get("evidence") or {}
        return (
            f"{c['name']}: {c['reason']} (Z = {ev.get('statistic')}, forgotten at ≤ "
            f"{ev.get('limit')} inside ±{(ev.get('band') or [0, 0])[1]}, false-release rate "
            f"{ev.get('false_release_rate')} > {ev.get('alpha')})"
        )
    return f"{c['name']}: {c['value']} > {c['limit']}"


def _first_reason(checks: list[dict[str, Any]], policy: dict[str, Any]) -> str | None:
    """One short code for why a result is held (None when it is released); a failed
    membership check comes first: forgetting is what escalation and reviewers act on."""
    for c in sorted(checks, key=lambda c: not c["name"].startswith("membership")):
        if c["ok"] is not True:
            if c.get("reason"):
                return str(c["reason"])
            return f"{c['name']}-not-measured" if c["ok"] is None else f"{c['name']}-failed"
    return "require-review" if policy.get("require_review") else None
