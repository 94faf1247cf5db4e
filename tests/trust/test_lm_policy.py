"""The release policy for causal LMs on metric dictionaries shaped as worker/lm_job.py
writes them: every check must pass, missing evidence fails, a destroyed model never passes."""

from __future__ import annotations

from typing import Any

import pytest

from service.domain.params import validate_params
from service.errors import Invalid
from service.settings import Settings
from service.trust.lm_policy import decide_lm
from service.trust.policy import effective_policy


def _metrics(recall: float, auc: float, ppl: float, probe: float) -> dict[str, Any]:
    return {
        "forget": {"exact_recall": recall},
        "heldout": {"perplexity": ppl},
        "member_probe": {"exact_recall": probe},
        "attacks": {"min_k_auc": auc, "auc_limit": 0.78},
    }


BEFORE = _metrics(1.0, 1.0, 35.0, 1.0)
DEFAULTS = effective_policy(Settings(), None)


def test_released_only_when_forgotten_and_useful() -> None:
    good = decide_lm(DEFAULTS, BEFORE, _metrics(0.0, 0.5, 36.0, 0.95))
    assert good["decision"] == "active" and good["failed"] == []
    assert good["thresholds"] == {
        "max_forget_recall": 0.05,
        "max_heldout_ppl_rise": 0.1,
        "max_probe_recall_drop": 0.1,
        "max_forget_auc_excess": 0.0,
    }
    # The fixture's measured outcome: still recited, still a member.
    held = decide_lm(DEFAULTS, BEFORE, _metrics(0.9, 1.0, 35.0, 0.99))
    assert held["decision"] == "candidate"
    assert held["failed"] == ["forget_recall", "forget_indistinguishable"]
    assert held["reasons"][0] == "forget_recall: 0.9 > 0.05"
    # Forgotten, but the retained records went with them.
    lost = decide_lm(DEFAULTS, BEFORE, _metrics(0.0, 0.5, 36.0, 0.85))
    assert lost["failed"] == ["probe_recall_drop"]


def test_a_destroyed_model_is_never_released() -> None:
    loosest = _policy(
        {
            "max_forget_recall": 1,
            "max_heldout_ppl_rise": 1,
            "max_probe_recall_drop": 1,
            "max_forget_auc_excess": 1,
        }
    )
    policy = {**DEFAULTS, **loosest}
    # Guards off on the fixture: recall 0, perplexity ×47.
    destroyed = decide_lm(policy, BEFORE, _metrics(0.0, 0.41, 1664.0, 0.0))
    assert destroyed["decision"] == "candidate" and destroyed["failed"] == ["heldout_ppl_rise"]
    nan = decide_lm(policy, BEFORE, _metrics(0.0, 0.41, float("nan"), 1.0))
    assert nan["failed"] == ["heldout_ppl_rise"] and "not measured" in nan["reasons"][0]
    with pytest.raises(Invalid):
        _policy({"max_heldout_ppl_rise": 5})


def _policy(overrides: dict) -> dict:
    """A request's `params.policy` as submission validates and stores it."""
    return validate_params("retrain", {"policy": overrides})["policy"]


def test_missing_evidence_fails_safe() -> None:
    only_forget = {"forget": {"exact_recall": 0.0}}
    result = decide_lm(DEFAULTS, only_forget, only_forget)
    assert result["decision"] == "candidate"
    assert result["failed"] == ["forget_indistinguishable", "heldout_ppl_rise", "probe_recall_drop"]
    assert all("not measured" in r for r in result["reasons"])
    review = decide_lm({**DEFAULTS, "require_review": True}, BEFORE, _metrics(0.0, 0.5, 35.0, 1.0))
    assert review["decision"] == "candidate" and review["failed"] == ["require_review"]


def test_an_exact_answer_reports_the_membership_auc_without_requiring_it() -> None:
    # Forgotten and useful, but the forget texts score apart from held-out ones in form.
    apart = _metrics(0.0, 0.80, 36.0, 0.95)
    assert decide_lm(DEFAULTS, BEFORE, apart)["failed"] == ["forget_indistinguishable"]
    exact = decide_lm(DEFAULTS, BEFORE, apart, exact=True)
    assert exact["decision"] == "active" and exact["failed"] == []
    shown = next(c for c in exact["checks"] if c["name"] == "forget_indistinguishable")
    assert shown["exact"] is True and shown["auc"] == 0.80 and shown["value"] > 0
    # Exact does not excuse recitation: the recall check still decides.
    recites = decide_lm(DEFAULTS, BEFORE, _metrics(0.5, 0.80, 36.0, 0.95), exact=True)
    assert recites["failed"] == ["forget_recall"]
