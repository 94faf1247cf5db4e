"""The attempts of one job: approximate forgetting, then exact retraining when it must.

A request is answered by its method (`imu`, `ga`: approximate; `retrain`: exact). When an
approximate result would be held (the membership test could not show forgetting within the
guard, a class is still recognised, or the policy half lost more accuracy than allowed) and
the model has a training recipe, the job goes on to retrain without the records
(``LETHE_ESCALATION=retrain``, the default): retraining answers every one of those reasons.
A causal LM's recipe re-fine-tunes its base (worker.lm_retrain); the LM policy judges it.
A result held for `require_review` is not escalated: that is a person's call. Every attempt
is kept (method, outcome, reason, evidence, seconds) for the request view and the audit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.domain.states import VersionStatus
from service.trust.lm_policy import decide_lm
from service.trust.policy import decide
from worker.loading import Loaded


@dataclass
class Answer:
    before: dict[str, Any]
    after: dict[str, Any]
    stats: dict[str, Any]
    policy: dict[str, Any]
    forgetting: str  # "approximate" | "exact"
    attempts: list[dict[str, Any]] = field(default_factory=list)


def _attempt(method: str, policy: dict[str, Any], after: dict[str, Any], seconds: float) -> dict:
    evidence = after.get("membership") or {}
    return {
        "method": method,
        "outcome": "released" if policy["decision"] == VersionStatus.ACTIVE else "held",
        "reason": policy.get("reason"),
        "evidence": {
            k: evidence.get(k) for k in ("outcome", "n", "statistic", "limit", "false_release_rate")
        }
        if evidence
        else None,
        "seconds": round(seconds, 3),
    }


def can_retrain(loaded: Loaded, escalation: str) -> bool:
    return escalation == "retrain" and loaded.recipe is not None and loaded.retained is not None


def escalates(loaded: Loaded, policy: dict[str, Any], escalation: str) -> bool:
    return (
        can_retrain(loaded, escalation)
        and policy["decision"] != VersionStatus.ACTIVE
        and not policy.get("require_review")
    )


def retrains_first(
    loaded: Loaded, rules: dict[str, Any], escalation: str, costs: dict[str, Any] | None
) -> bool:
    """The model's measured costs say retraining costs no more than trying first
    (worker.routing); a request that asks for review gets the method it asked for."""
    return (
        costs is not None
        and bool(costs.get("exact_first"))
        and loaded.method != "retrain"
        and can_retrain(loaded, escalation)
        and not rules.get("require_review")
    )


def answer(
    loaded: Loaded,
    before: dict[str, Any],
    rules: dict[str, Any],
    *,
    escalation: str,
    evaluate: Callable[[Loaded], dict[str, Any]],
    approximate: Callable[[Loaded], dict[str, Any]],
    exact: Callable[[Loaded], dict[str, Any]],
    costs: dict[str, Any] | None = None,
) -> Answer:
    """Run the request's method, escalate if it must; ``loaded.model`` ends as the answer.
    ``costs`` (worker.routing) may send an approximate request straight to the retrain."""

    def judge(after: dict[str, Any], stats: dict[str, Any], *, is_exact: bool) -> dict:
        if loaded.lm:
            return decide_lm(rules, before, after, exact=is_exact)
        stopped = (stats.get("calibration") or {}).get("reason")
        return decide(
            rules, before, after, class_wise=loaded.class_wise, stopped=stopped, exact=is_exact
        )

    t0 = time.perf_counter()
    first = retrains_first(loaded, rules, escalation, costs)
    if loaded.method == "retrain" or first:
        stats = exact(loaded)
        after = evaluate(loaded)
        policy = judge(after, stats, is_exact=True)
        attempt = _attempt("retrain", policy, after, time.perf_counter() - t0)
        if first:
            attempt["instead_of"] = {"method": loaded.method, "reason": "cheaper", **(costs or {})}
            stats = {**stats, "instead_of": attempt["instead_of"]}
        return Answer(before, after, stats, policy, "exact", [attempt])
    stats = approximate(loaded)
    after = evaluate(loaded)
    policy = judge(after, stats, is_exact=False)
    attempts = [_attempt(loaded.method, policy, after, time.perf_counter() - t0)]
    if not escalates(loaded, policy, escalation):
        if loaded.exact_route and policy["decision"] != VersionStatus.ACTIVE:
            attempts[0]["no_escalation"] = loaded.exact_route
        return Answer(before, after, stats, policy, "approximate", attempts)
    t1 = time.perf_counter()
    retrain_stats = exact(loaded)
    after = evaluate(loaded)
    policy = judge(after, retrain_stats, is_exact=True)
    attempts.append(_attempt("retrain", policy, after, time.perf_counter() - t1))
    stats = {**retrain_stats, "escalated_from": {"method": loaded.method, "stats": stats}}
    return Answer(before, after, stats, policy, "exact", attempts)


__all__ = ["Answer", "answer", "can_retrain", "escalates", "retrains_first"]
