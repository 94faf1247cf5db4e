"""Release policy for causal language models: `active` only when the records are forgotten
AND the model stays useful; otherwise a `candidate` naming the failed checks.

The metrics are worker/lm_job.lm_metrics before and after unlearning, on the forget set, the
eval set's policy half (held-out texts the controller never saw) and the member probe
(retained training texts, never used for unlearning). Four checks, all required:

- `forget_recall`: greedy exact recall of the forget set after ≤ `max_forget_recall`;
- `forget_indistinguishable`: the min-k% (k = 40 %) membership AUC forget vs held-out lies
  within 2·SE of 0.5 on either side (+ `max_forget_auc_excess`): above, the records still
  look trained on; below, they were pushed past unseen level, itself a membership signal
  (aggressive runs measured AUC 0.0-0.17 and passed the one-sided test);
- `heldout_ppl_rise`: held-out perplexity after / before − 1 ≤ `max_heldout_ppl_rise`;
- `probe_recall_drop`: the share of the member probe's exact recall that was lost,
  1 − after / before, ≤ `max_probe_recall_drop`.

Fail safe: a check that could not run (no eval or member-probe dataset, a non-finite value)
fails. The thresholds are bounded to [0, 1] (params.PolicyOverrides), so a model whose
held-out perplexity more than doubled — a destroyed model — can never pass, whatever a
request asks for.
"""

from __future__ import annotations

import math
from typing import Any

from service.trust.policy import LM_THRESHOLDS, check, verdict


def _get(metrics: dict[str, Any], *path: str) -> float | None:
    value: Any = metrics
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(float(value)) else None


def decide_lm(
    policy: dict[str, Any], before: dict[str, Any], after: dict[str, Any], *, exact: bool = False
) -> dict:
    """``exact``: the answer was re-fine-tuned without the records, so the membership AUC is
    reported, not required (as `policy.membership_check` does for classifiers): forget texts
    can differ from held-out ones in form, and a model that never saw them still scores them
    apart (measured AUC 0.861 against a limit of 0.860 on one CPU)."""
    recall = _get(after, "forget", "exact_recall")
    auc, auc_limit = _get(after, "attacks", "min_k_auc"), _get(after, "attacks", "auc_limit")
    ppl0, ppl1 = _get(before, "heldout", "perplexity"), _get(after, "heldout", "perplexity")
    probe0 = _get(before, "member_probe", "exact_recall")
    probe1 = _get(after, "member_probe", "exact_recall")
    rise = ppl1 / ppl0 - 1.0 if ppl0 and ppl1 is not None else None
    lost = None
    if probe0 is not None and probe1 is not None:
        lost = 1.0 - probe1 / probe0 if probe0 > 0 else 0.0
    checks = [
        check(
            "forget_recall",
            recall,
            policy["max_forget_recall"],
            "no forget recall",
            metric="after.forget.exact_recall",
        ),
        check(
            "forget_indistinguishable",
            None if auc is None or auc_limit is None else abs(auc - 0.5) - (auc_limit - 0.5),
            policy["max_forget_auc_excess"],
            "no eval dataset to compare the forget set with",
            metric="|min_k_auc - 0.5| - (auc_limit - 0.5)",
            auc=auc,
            auc_limit=auc_limit,
        ),
        check(
            "heldout_ppl_rise",
            rise,
            policy["max_heldout_ppl_rise"],
            "no eval dataset (held-out perplexity)",
            metric="ppl_after / ppl_before - 1",
            before=ppl0,
            after=ppl1,
        ),
        check(
            "probe_recall_drop",
            lost,
            policy["max_probe_recall_drop"],
            "no member_probe dataset (retained-record recall)",
            metric="1 - probe_recall_after / probe_recall_before",
            before=probe0,
            after=probe1,
        ),
    ]
    if exact:
        note = "exact: re-fine-tuned without the records; the AUC is reported, not required"
        checks = [
            {**c, "ok": True, "exact": True, "note": note}
            if c["name"] == "forget_indistinguishable"
            else c
            for c in checks
        ]
    return verdict(checks, policy, mode="text", class_wise=False, thresholds=LM_THRESHOLDS)
