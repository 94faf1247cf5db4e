"""What the calibration controller measures between steps on a causal LM — the text
counterpart of ``checks.Checks``, with the same interface (``measure``, ``has_target``,
``target_met``, ``guard_failed``) so ``calibrated_ascent`` runs unchanged.

- Target: forget verbatim recall ≤ ``recall_target`` AND the forget set looks unseen by one of
  two tests: its mean NLL reached the held-out NLL of the model before unlearning, or the
  min-k% (k = 40 %) membership AUC forget vs held-out is within 0.5 + 2·SE. Two tests
  because with ~20 forget records the AUC's standard error is large, and the NLL level is
  the direct "toward held-out" criterion.
- Guard: held-out perplexity may rise by at most ``ppl_max_rise`` (relative), and member-probe
  (retained records) recall may drop by at most ``max_drop`` (absolute). The study in
  LANGUAGE_MODELS.md found retain-free ascent destroys retained recall before forget recall
  is gone; this guard is what stops it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from worker.imu.checks import loss_auc
from worker.imu.lm_data import TokenBatch
from worker.imu.text_metrics import record_stats, split_summary


@dataclass
class TextMeasurement:
    forget_recall: float
    forget_nll: float
    heldout_nll: float | None = None
    heldout_ppl: float | None = None
    probe_recall: float | None = None
    auc: float | None = None  # min-k% membership AUC, forget vs held-out
    auc_limit: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {k: (None if v is None else round(float(v), 6)) for k, v in asdict(self).items()}


class TextChecks:
    def __init__(
        self,
        model: nn.Module,
        forget: TokenBatch,
        heldout: TokenBatch | None,
        member_probe: TokenBatch | None = None,
        *,
        recall_target: float = 0.0,
        ppl_max_rise: float = 0.1,
    ) -> None:
        self.model, self.forget = model, forget
        self.heldout = heldout if heldout is not None and len(heldout) else None
        self.probe = member_probe if member_probe is not None and len(member_probe) else None
        self.recall_target, self.ppl_max_rise = recall_target, ppl_max_rise
        # The level to reach is the held-out NLL of the model before unlearning: the current
        # held-out NLL rises with the damage, and chasing it would reward destruction.
        self.nll_target: float | None = None
        if self.heldout is not None:
            self.nll_target = split_summary(record_stats(model, self.heldout))["nll"]

    @property
    def has_target(self) -> bool:
        """The NLL level and the AUC both need held-out texts."""
        return self.heldout is not None

    def measure(self) -> TextMeasurement:
        f = record_stats(self.model, self.forget)
        out = TextMeasurement(
            forget_recall=float(f["recall"].double().mean()),
            forget_nll=float(f["nll"].double().mean()),
        )
        if self.heldout is not None:
            e = record_stats(self.model, self.heldout)
            summary = split_summary(e)
            out.heldout_nll, out.heldout_ppl = summary["nll"], summary["perplexity"]
            # min-k scores are log-probs (higher = member): negate them into "losses".
            out.auc, out.auc_limit = loss_auc(-f["min_k"], -e["min_k"])
        if self.probe is not None:
            out.probe_recall = float(record_stats(self.model, self.probe)["recall"].double().mean())
        return out

    def target_met(self, m: TextMeasurement) -> bool:
        if m.forget_recall > self.recall_target or self.nll_target is None:
            return False
        unseen_auc = m.auc is not None and m.auc_limit is not None and m.auc <= m.auc_limit
        return unseen_auc or m.forget_nll >= self.nll_target

    @staticmethod
    def overshot(m: TextMeasurement) -> bool:
        """Pushed past unseen level: the min-k AUC below 0.5 by more than its 2·SE margin
        (the release policy's check is two-sided)."""
        return m.auc is not None and m.auc_limit is not None and m.auc < 1.0 - m.auc_limit

    def guard_failed(self, start: TextMeasurement, now: TextMeasurement, max_drop: float) -> bool:
        before, after = start.heldout_ppl, now.heldout_ppl
        if before is not None and after is not None and after > before * (1 + self.ppl_max_rise):
            return True
        if start.probe_recall is not None and now.probe_recall is not None:
            return start.probe_recall - now.probe_recall > max_drop
        return False
