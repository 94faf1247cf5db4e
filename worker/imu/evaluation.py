"""Before/after evaluation (ALGORITHM.md §6): accuracies and the SVC membership-inference attack.

MIA as in the paper's evaluation: an RBF SVM (C=3, gamma="auto") learns to tell the member
probe (retained training records, label 1) from the eval set (label 0) on features of the
model's outputs; its efficacy on the forget set is the share of forgotten records it calls
non-members (higher = better forgotten). The two shadow sets are balanced by subsampling
the larger one (seeded), so the attack is not biased towards the bigger class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.imu._util import as_inputs, as_labels, check_pair, model_device, model_dtype
from worker.imu._util import preserved_modes as _modes

Pair = tuple[torch.Tensor, torch.Tensor]
MIA_FEATURES = ("efficacy", "confidence", "entropy", "m_entropy", "correctness")
MIA_MAX_PER_CLASS = 5000  # an RBF SVC is quadratic in its training set


@torch.no_grad()
def softmax_outputs(model: nn.Module, inputs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Softmax probabilities in eval mode, float64 on the CPU; flags restored afterwards."""
    inputs = torch.as_tensor(inputs)
    device, dtype = model_device(model), model_dtype(model)
    outs = []
    with _modes(model, train=False):
        for start in range(0, inputs.shape[0], batch_size):
            logits = model(as_inputs(inputs[start : start + batch_size], device, dtype))
            outs.append(torch.softmax(logits.double(), dim=1).cpu())
    if not outs:
        return torch.empty((0, 0), dtype=torch.float64)
    return torch.cat(outs)


def _features(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """The five attack feature sets of ALGORITHM.md §6, one row per record."""
    eps = 1e-30
    y = labels.long()
    p_y = probs.gather(1, y[:, None]).squeeze(1)
    entropy = -(probs * probs.clamp_min(eps).log()).sum(1)
    # Modified entropy (Song & Mittal): -(1-p_y) log p_y - sum_{c!=y} p_c log(1-p_c).
    one_minus = (1 - probs).clamp_min(eps)
    others = probs * one_minus.log()
    others = others.sum(1) - others.gather(1, y[:, None]).squeeze(1)
    m_entropy = -(1 - p_y) * p_y.clamp_min(eps).log() - others
    correct = (probs.argmax(1) == y).double()
    return {
        "efficacy": probs.numpy(),
        "confidence": p_y[:, None].numpy(),
        "entropy": entropy[:, None].numpy(),
        "m_entropy": m_entropy[:, None].numpy(),
        "correctness": correct[:, None].numpy(),
    }


def _balanced(n_pos: int, n_neg: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    m = min(n_pos, n_neg, MIA_MAX_PER_CLASS)
    rng = np.random.default_rng(seed)
    return (
        np.sort(rng.permutation(n_pos)[:m]),
        np.sort(rng.permutation(n_neg)[:m]),
    )


def svc_mia(
    member: tuple[torch.Tensor, torch.Tensor],
    nonmember: tuple[torch.Tensor, torch.Tensor],
    target: tuple[torch.Tensor, torch.Tensor],
    seed: int = 0,
) -> dict[str, float]:
    """Fit one SVC per feature set on (member probs, labels) vs (non-member probs, labels);
    return for each the share of ``target`` records predicted non-member.

    Raises ValueError when the attack cannot be trained (a side empty)."""
    from sklearn.svm import SVC

    (pm, ym), (pn, yn), (pt, yt) = member, nonmember, target
    if pm.shape[0] == 0 or pn.shape[0] == 0:
        raise ValueError("the SVC needs both members and non-members")
    if pt.shape[0] == 0:
        raise ValueError("no target records to attack")
    im, inn = _balanced(pm.shape[0], pn.shape[0], seed)
    fm, fn, ft = _features(pm, ym), _features(pn, yn), _features(pt, yt)
    out: dict[str, float] = {}
    for name in MIA_FEATURES:
        x = np.concatenate([fm[name][im], fn[name][inn]])
        lab = np.concatenate([np.ones(len(im)), np.zeros(len(inn))])
        clf = SVC(C=3, gamma="auto", kernel="rbf")
        clf.fit(x, lab)
        pred = clf.predict(ft[name])
        out[f"mia_{name}"] = float(1.0 - pred.mean())
    return out


def _accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(1) == labels).double().mean())


def evaluate(
    model: nn.Module,
    *,
    forget: Pair,
    eval: Pair | None,  # noqa: A002 - the dataset role's name in the API
    member_probe: Pair | None = None,
    batch_size: int = 512,
    seed: int = 0,
    outputs: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Accuracies and SVC-MIA efficacies as plain floats (JSON-ready).

    Keys: ``forget_acc``, ``eval_acc``, ``member_probe_acc``, ``n_forget``/``n_eval``/
    ``n_member_probe`` and, with a member probe, ``mia_efficacy`` (softmax outputs),
    ``mia_confidence``, ``mia_entropy``, ``mia_m_entropy``, ``mia_correctness``. Missing sets
    leave their keys out; when the attack cannot be trained its keys are absent and
    ``mia_error`` says why — numbers are never invented. Accuracy of an empty set is absent.
    ``outputs(x) -> logits``: the caller's (cached) logits of a whole set instead of a pass
    through ``model`` here.
    """
    result: dict[str, Any] = {}
    probs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for role, pair in (("forget", forget), ("eval", eval), ("member_probe", member_probe)):
        if pair is None:
            continue
        x, y = pair
        n = check_pair(x, y, role)
        y = as_labels(y)
        if outputs is None:
            p = softmax_outputs(model, x, batch_size)
        else:
            p = torch.softmax(outputs(x).double(), dim=1).cpu() if n else torch.empty((0, 0))
        result[f"n_{role}"] = n
        if n:
            result[f"{role}_acc"] = _accuracy(p, y)
            probs[role] = (p, y)
    if member_probe is None:
        return result
    try:
        missing = [r for r in ("member_probe", "eval", "forget") if r not in probs]
        if missing:
            raise ValueError(f"empty or missing set(s): {', '.join(missing)}")
        mia = svc_mia(probs["member_probe"], probs["eval"], probs["forget"], seed=seed)
        if not all(math.isfinite(v) for v in mia.values()):
            raise ValueError("non-finite attack result")
        result.update(mia)
    except ValueError as exc:  # sklearn raises ValueError for degenerate training sets
        result["mia_error"] = f"membership-inference attack not computed: {exc}"
    return result
