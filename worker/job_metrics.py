"""Before/after metrics of a job (ALGORITHM.md §6), measured on the policy half of the eval
set: accuracies, the SVC membership attacks, the retained-classes accuracy of class-wise
requests, the loss-AUC indistinguishability test of the others, and the per-record
membership evidence (``membership``: forget records against the model's members and its
whole eval set, the test the release policy decides on)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from worker.imu import evaluate
from worker.imu.checks import loss_auc
from worker.imu.membership import MembershipTest
from worker.imu.membership_parts import assess_with_parts
from worker.imu.set_outputs import SetOutputs

Pair = tuple[torch.Tensor, torch.Tensor]


def jsonable(value: Any) -> Any:
    """Plain JSON: finite floats (NaN/inf become null), lists, string keys."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    return str(value)


def retained_classes_accuracy(
    logits: torch.Tensor, labels: Any, forget_labels: Any
) -> float | None:
    """Accuracy on the eval records whose class is not being forgotten (None if none are)."""
    y = torch.as_tensor(labels).long()
    keep = ~torch.isin(y, torch.unique(torch.as_tensor(forget_labels)))
    if not bool(keep.any()):
        return None
    return float((logits[keep].argmax(1) == y[keep]).double().mean())


def per_class_accuracy(logits: torch.Tensor, labels: Any) -> dict[str, float]:
    """Eval accuracy per class label (the console draws it before and after)."""
    y = torch.as_tensor(labels).long()
    hit = logits.argmax(1) == y
    return {str(int(c)): float(hit[y == c].double().mean()) for c in torch.unique(y).tolist()}


def _losses(logits: torch.Tensor, labels: Any) -> torch.Tensor:
    return F.cross_entropy(logits, torch.as_tensor(labels).long(), reduction="none")


def job_metrics(
    model: Any,
    *,
    forget: Pair,
    eval_pair: Pair | None,
    member_probe: Pair | None,
    class_wise: bool,
    membership: MembershipTest | None = None,
    parts: list[list[int]] | None = None,
    outputs: SetOutputs | None = None,
    eval_rows: Sequence[int] | torch.Tensor | None = None,
) -> dict[str, Any]:
    """``parts``: for a coalesced run, each request's records (indices into ``forget``),
    judged on their own as well (``membership_parts``). ``outputs``: the logits cache of this
    model state (a new one by default; the caller may carry one from the released previous
    version); ``eval_rows``: where the eval records sit in the membership test's non-members,
    so that set goes through the model once."""
    outputs = outputs if outputs is not None else SetOutputs(model)
    if membership is not None:
        outputs.derive(membership.forget[0], forget[0], membership.picked)
        if eval_pair is not None and eval_rows is not None:
            outputs.derive(eval_pair[0], membership.nonmembers[0], eval_rows)
    result = dict(
        evaluate(
            model,
            forget=forget,
            eval=eval_pair,
            member_probe=member_probe if eval_pair is not None else None,
            outputs=outputs,
        )
    )
    if eval_pair is not None and int(torch.as_tensor(eval_pair[1]).numel()) > 0:
        eval_logits = outputs(eval_pair[0])
        if class_wise:
            # Forgetting a whole class necessarily costs its share of eval accuracy; utility
            # kept is judged on the classes that remain (the release policy uses this).
            retained = retained_classes_accuracy(eval_logits, eval_pair[1], forget[1])
            if retained is not None:
                result["eval_acc_retained_classes"] = retained
        result["per_class_acc"] = per_class_accuracy(eval_logits, eval_pair[1])
        auc, limit = loss_auc(
            _losses(outputs(forget[0]), forget[1]), _losses(eval_logits, eval_pair[1])
        )
        result["forget_loss_auc"], result["forget_loss_auc_limit"] = auc, limit
    if membership is not None and parts is not None:
        whole, each = assess_with_parts(membership, outputs, parts)
        result["membership"] = whole.as_dict()
        result["membership_parts"] = [None if ev is None else ev.as_dict() for ev in each]
    elif membership is not None:
        result["membership"] = membership.assess(outputs).as_dict()
    return jsonable(result)
