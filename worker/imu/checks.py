"""What the calibration controller measures between steps (ALGORITHM.md §5), and the
indistinguishability test the release policy reuses.

- Class-wise requests: target forget accuracy ≤ ``forget_acc_target``; utility guard on the
  held-out records of the remaining classes.
- Other requests: target "the forget set looks unseen": the AUC of per-sample loss, forget
  vs held-out, is at most 0.5 + 2·SE (``loss_auc``); utility guard on all held-out records.
  The limit is computed for the sample sizes the release policy will test (the whole forget
  set against a held-out half), not for the subsets a check scores: with more than
  ``CHECK_FORGET_MAX`` forget records the subset's looser limit let the controller stop where
  the policy then held the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.imu._util import as_inputs, model_device, model_dtype, preserved_modes
from worker.imu.membership import OVER_FORGOTTEN, Evidence, MembershipTest

LogitsFn = Callable[[], torch.Tensor]
AUC_Z = 2.0  # the target's margin in standard errors of the AUC under "no difference"


def auc_limit(n_forget: int, n_heldout: int, z: float = AUC_Z) -> float:
    """0.5 + z·SE with SE = √((n_f + n_e + 1) / (12 n_f n_e)), the Mann-Whitney standard
    error of the AUC under "no difference"."""
    return 0.5 + z * math.sqrt((n_forget + n_heldout + 1) / (12.0 * n_forget * n_heldout))


def loss_auc(
    forget_losses: torch.Tensor, heldout_losses: torch.Tensor, z: float = AUC_Z
) -> tuple[float, float]:
    """(AUC, limit): AUC = P(a held-out loss exceeds a forget loss), ties counted half —
    0.5 when the forget set looks like unseen data, 1 when every forget record fits better;
    limit = ``auc_limit`` for these sample sizes."""
    f = forget_losses.detach().double().flatten().cpu()
    e = heldout_losses.detach().double().flatten().cpu()
    n_f, n_e = f.numel(), e.numel()
    if n_f == 0 or n_e == 0:
        raise ValueError("the AUC needs forget and held-out losses")
    wins = 0.0
    for start in range(0, n_f, 1024):
        part = f[start : start + 1024, None]
        wins += float((e[None, :] > part).sum()) + 0.5 * float((e[None, :] == part).sum())
    return wins / (n_f * n_e), auc_limit(n_f, n_e, z)


@torch.no_grad()
def model_logits(
    model: nn.Module, inputs: torch.Tensor, batch_size: int = 512, *, as_float: bool = True
) -> LogitsFn:
    """Logits of ``inputs`` in eval mode, recomputed at each call (the model moves); float32
    unless ``as_float`` is off (then the model's own dtype)."""
    x = torch.as_tensor(inputs)

    @torch.no_grad()
    def logits() -> torch.Tensor:
        device, dtype = model_device(model), model_dtype(model)
        with preserved_modes(model, train=False):
            outs = [
                model(as_inputs(x[s : s + batch_size], device, dtype))
                for s in range(0, x.shape[0], batch_size)
            ]
        out = torch.cat(outs)
        return out.float() if as_float else out

    return logits


@torch.no_grad()
def head_inputs(
    model: nn.Module, head: nn.Linear, inputs: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """The inputs of ``head`` for every record (eval mode): the cached features."""
    x = torch.as_tensor(inputs)
    device, dtype = model_device(model), model_dtype(model)
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    try:
        with preserved_modes(model, train=False):
            for s in range(0, x.shape[0], batch_size):
                model(as_inputs(x[s : s + batch_size], device, dtype))
    finally:
        handle.remove()
    return torch.cat(seen)


def cached_head_logits(head: nn.Linear, features: torch.Tensor) -> LogitsFn:
    @torch.no_grad()
    def logits() -> torch.Tensor:
        return F.linear(features.to(head.weight.dtype), head.weight, head.bias).float()

    return logits


@dataclass
class Measurement:
    forget_acc: float
    guard_acc: float | None = None
    auc: float | None = None
    auc_limit: float | None = None
    evidence: Evidence | None = None  # the membership test, when the caller gave one

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: (None if v is None else round(float(v), 6))
            for k, v in asdict(self).items()
            if k != "evidence"
        }
        if self.evidence is not None:
            ev = self.evidence
            out["membership"] = {
                "outcome": ev.outcome,
                "statistic": round(ev.statistic, 4),
                "limit": round(ev.z_limit_forgotten, 4),
                "false_release_rate": round(ev.false_release_rate, 6),
            }
        return out


class Checks:
    """Forget accuracy, guard accuracy and the loss AUC, from logits functions."""

    def __init__(
        self,
        forget: tuple[LogitsFn, torch.Tensor],
        guard: tuple[LogitsFn, torch.Tensor] | None,
        *,
        class_wise: bool,
        forget_acc_target: float,
        auc_sizes: tuple[int, int] | None = None,
        membership: tuple[MembershipTest, nn.Module] | None = None,
    ) -> None:
        self.forget_logits, self.forget_labels = forget[0], forget[1].long()
        self.guard = None
        if guard is not None and guard[1].numel() > 0:
            self.guard = (guard[0], guard[1].long())
        self.class_wise = class_wise
        self.forget_acc_target = forget_acc_target
        # (n forget, n held-out) the AUC limits are computed for; None = the scored subsets.
        self.auc_sizes = auc_sizes
        self.membership = membership
        forgotten = torch.unique(self.forget_labels)
        self.guard_keep = None
        if self.guard is not None and class_wise:
            # Forgetting a class costs its share of accuracy: guard the classes that remain.
            self.guard_keep = ~torch.isin(self.guard[1], forgotten)

    @property
    def has_target(self) -> bool:
        """Class-wise targets need only the forget set; the AUC test needs held-out data."""
        return self.class_wise or self.guard is not None or self.membership is not None

    def measure(self) -> Measurement:
        logits = self.forget_logits()
        y = self.forget_labels.to(logits.device)
        result = Measurement(forget_acc=float((logits.argmax(1) == y).double().mean()))
        if self.membership is not None:
            test, model = self.membership
            result.evidence = test.assess(lambda x: model_logits(model, x)())
        if self.guard is None:
            return result
        g_logits = self.guard[0]()
        g_y = self.guard[1].to(g_logits.device)
        correct = g_logits.argmax(1) == g_y
        if self.guard_keep is not None:
            kept = self.guard_keep.to(correct.device)
            result.guard_acc = float(correct[kept].double().mean()) if kept.any() else None
        else:
            result.guard_acc = float(correct.double().mean())
        if not self.class_wise:
            result.auc, result.auc_limit = loss_auc(
                F.cross_entropy(logits, y, reduction="none"),
                F.cross_entropy(g_logits, g_y, reduction="none"),
            )
            if self.auc_sizes is not None:
                result.auc_limit = auc_limit(*self.auc_sizes)
        return result

    def target_met(self, m: Measurement) -> bool:
        """With a membership test: its evidence releases (class-wise requests also at their
        forget-accuracy target); without one, the AUC test or the class-wise target."""
        if m.evidence is not None:
            at_acc = not self.class_wise or m.forget_acc <= self.forget_acc_target
            return m.evidence.releases and at_acc
        if self.class_wise:
            return m.forget_acc <= self.forget_acc_target
        return m.auc is not None and m.auc_limit is not None and m.auc <= m.auc_limit

    @staticmethod
    def overshot(m: Measurement) -> bool:
        """Pushed past unseen level: the records now stand out the other way."""
        return m.evidence is not None and m.evidence.outcome == OVER_FORGOTTEN

    @staticmethod
    def guard_failed(start: Measurement, now: Measurement, max_drop: float) -> bool:
        if start.guard_acc is None or now.guard_acc is None:
            return False
        return start.guard_acc - now.guard_acc > max_drop


CHECK_FORGET_MAX = 512  # forget records looked at per check
CHECK_GUARD_MAX = 4096  # held-out records looked at per check


def _subset(n: int, limit: int, seed: int) -> torch.Tensor:
    if n <= limit:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n, generator=generator)[:limit]).values


def build_checks(
    model: nn.Module,
    forget: tuple[torch.Tensor, torch.Tensor],
    heldout: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    class_wise: bool,
    forget_acc_target: float,
    seed: int,
    head: nn.Linear | None = None,
    forget_features: torch.Tensor | None = None,
    membership: MembershipTest | None = None,
) -> Checks:
    """Checks on seeded subsets of the forget and held-out sets. With ``head`` (θ is the
    head and the backbone is frozen in eval mode) the logits come from cached features."""
    x_f, y_f = forget
    pick = _subset(int(y_f.shape[0]), CHECK_FORGET_MAX, seed)
    if head is not None:
        feats = forget_features if forget_features is not None else head_inputs(model, head, x_f)
        forget_fn = cached_head_logits(head, feats[pick.to(feats.device)])
    else:
        forget_fn = model_logits(model, x_f[pick])
    guard, sizes = None, None
    if heldout is not None and int(heldout[1].shape[0]) > 0:
        x_e, y_e = heldout
        sizes = (int(y_f.shape[0]), int(y_e.shape[0]))
        pick_e = _subset(int(y_e.shape[0]), CHECK_GUARD_MAX, seed + 1)
        x_e, y_e = x_e[pick_e], torch.as_tensor(y_e)[pick_e]
        if head is not None:
            guard = (cached_head_logits(head, head_inputs(model, head, x_e)), y_e)
        else:
            guard = (model_logits(model, x_e), y_e)
    return Checks(
        (forget_fn, torch.as_tensor(y_f)[pick]),
        guard,
        class_wise=class_wise,
        forget_acc_target=forget_acc_target,
        auc_sizes=sizes,
        membership=None if membership is None else (membership, model),
    )
