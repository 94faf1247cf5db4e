"""Text metrics of a causal LM on token batches (ALGORITHM.md §7).

- perplexity: exp of the token-weighted mean NLL over a split's scored tokens;
- completion NLL: the mean over records of each record's mean token NLL;
- exact-match token accuracy: share of scored tokens that are the argmax given the true prefix;
- greedy exact recall: 1 when greedy decoding from the prefix reproduces the reference
  continuation exactly. Computed by teacher forcing: greedy output equals the reference iff at
  every continuation position the argmax given the reference prefix is the reference token
  (by induction over positions), so one batched forward replaces a generation loop;
- membership attacks, scores oriented "higher = looks like a training member": loss
  (−NLL), zlib (−NLL·tokens / zlib bits of the text, Carlini et al. 2021) and min-k% prob
  (mean of the lowest k = 40 % token log-probs, Shi et al. 2024); AUC = P(member score of a
  forget record > that of a held-out record), 0.5 = indistinguishable.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
from torch import nn

from worker.imu._util import model_device, preserved_modes
from worker.imu.checks import loss_auc
from worker.imu.lm_data import TokenBatch, lm_logits, token_logprobs

MIN_K = 0.4
EVAL_BATCH = 32


@torch.no_grad()
def record_stats(model: nn.Module, batch: TokenBatch, batch_size: int = EVAL_BATCH) -> dict:
    """Per-record tensors (n,): nll (mean), tokens, correct (argmax hits), recall (0/1),
    min_k (mean of the lowest 40 % log-probs), all on the CPU, in eval mode."""
    device = model_device(model)
    names = ("nll", "tokens", "correct", "recall", "min_k")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    with preserved_modes(model, train=False):
        for start in range(0, len(batch), batch_size):
            sub = batch.take(range(start, min(len(batch), start + batch_size)))
            ids, scored = sub.ids.to(device), sub.scored.to(device)
            logits = lm_logits(model, ids)
            lp = token_logprobs(logits, ids)
            hit = torch.zeros_like(scored)
            hit[:, 1:] = logits[:, :-1].argmax(-1) == ids[:, 1:]
            count = scored.sum(-1)
            parts["nll"].append((-(lp * scored).sum(-1) / count.clamp(min=1)).cpu())
            parts["tokens"].append(count.cpu())
            parts["correct"].append((hit & scored).sum(-1).cpu())
            # Recall is judged on what follows the prefix, whatever the loss covers.
            pos = torch.arange(ids.shape[1], device=device)[None, :]
            cont = (pos >= sub.prefix_len.to(device)[:, None]) & (ids != sub.pad_id)
            cont[:, 0] = False
            parts["recall"].append(((hit | ~cont).all(-1) & cont.any(-1)).cpu())
            parts["min_k"].append(_min_k(lp, scored).cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def _min_k(lp: torch.Tensor, scored: torch.Tensor, k: float = MIN_K) -> torch.Tensor:
    out = torch.empty(lp.shape[0], dtype=lp.dtype, device=lp.device)
    for i in range(lp.shape[0]):
        vals = lp[i][scored[i]]
        m = max(1, math.ceil(k * vals.numel()))
        out[i] = torch.sort(vals).values[:m].mean() if vals.numel() else 0.0
    return out


def exact_recall(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Per-record greedy exact recall (0/1 floats)."""
    return record_stats(model, batch)["recall"].double()


def zlib_scores(texts: list[str], nll: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    bits = torch.tensor([8.0 * len(zlib.compress(t.encode("utf-8"))) for t in texts])
    return -(nll.double() * tokens.double()) / bits.double()


def attack_auc(member_scores_forget: torch.Tensor, member_scores_heldout: torch.Tensor) -> float:
    """P(forget score > held-out score), ties half (``loss_auc`` on negated scores)."""
    return loss_auc(-member_scores_forget, -member_scores_heldout)[0]


def split_summary(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    tokens = stats["tokens"].double()
    total_nll = float((stats["nll"].double() * tokens).sum())
    return {
        "records": int(tokens.numel()),
        "perplexity": math.exp(min(total_nll / max(1.0, float(tokens.sum())), 700.0)),
        "nll": float(stats["nll"].double().mean()),
        "token_accuracy": float(stats["correct"].double().sum() / tokens.sum().clamp(min=1)),
        "exact_recall": float(stats["recall"].double().mean()),
        "min_k": float(stats["min_k"].double().mean()),
    }


def evaluate_lm(
    model: nn.Module,
    forget: TokenBatch,
    heldout: TokenBatch | None = None,
    member_probe: TokenBatch | None = None,
) -> dict[str, Any]:
    """Per split summaries and, with held-out texts, the three attack AUCs forget vs held-out."""
    raw = {"forget": record_stats(model, forget)}
    if heldout is not None:
        raw["heldout"] = record_stats(model, heldout)
    if member_probe is not None:
        raw["member_probe"] = record_stats(model, member_probe)
    out: dict[str, Any] = {name: split_summary(s) for name, s in raw.items()}
    if heldout is not None:
        f, e = raw["forget"], raw["heldout"]
        out["attacks"] = {
            "loss_auc": attack_auc(-f["nll"], -e["nll"]),
            "zlib_auc": attack_auc(
                zlib_scores(forget.texts, f["nll"], f["tokens"]),
                zlib_scores(heldout.texts, e["nll"], e["tokens"]),
            ),
            "min_k_auc": attack_auc(f["min_k"], e["min_k"]),
        }
    return out
