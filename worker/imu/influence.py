"""Influence scores I_i = -g_i^T F^-1 ḡ (ALGORITHM.md §2).

Three ways to the same numbers:

* ``closed_form`` — θ is (part of) the final Linear and its output is the logits. With
  features h_i, softmax p_i and e_i = p_i - onehot(y_i), the per-sample gradients are
  g_i(W) = e_i h_i^T and g_i(b) = e_i, so the diagonal Fisher, the mean gradient and every
  I_i come from one batched forward and a few matrix products. Memory is n x (d + C) for
  the cached features and errors plus C x d accumulators — never n x P.
* ``func`` — any θ: per-sample gradients with ``torch.func`` (vmap over grad of a
  functional call), chunked; cached between the two passes only when small.
* ``loop`` — the authors' procedure: batch-of-one backward passes, one loop for the Fisher
  and the mean gradient, a second for the scores. The reference, and the fallback when a
  model cannot be vmapped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from worker.imu._util import (
    Head,
    Progress,
    as_inputs,
    as_labels,
    check_pair,
    chunks,
    find_head,
    head_parts,
    model_device,
    model_dtype,
    only_these_require_grad,
    preserved_modes,
    resolve_theta,
)

METHODS = ("auto", "closed_form", "func", "loop")
# Per-sample gradients up to this size are kept between the two passes of the func path.
FUNC_CACHE_BYTES = 256 * 1024 * 1024


class _NotLogits(Exception):
    """The head's output differed from the model's output on some chunk."""


@dataclass
class InfluenceResult:
    scores: torch.Tensor  # (n,), on the CPU
    method: str  # closed_form | func | loop
    theta: list[str]  # parameter names θ
    theta_numel: int
    head: str | None
    notes: list[str] = field(default_factory=list)
    # closed form only: the head's inputs (n, d) on the model's device, for eval-mode reuse
    features: torch.Tensor | None = None


def influence_scores(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    params: Sequence[str] | None = None,
    damping: float = 0.01,
    batch_size: int = 512,
    method: str = "auto",
) -> torch.Tensor:
    """Influence score of every sample, shape (n,), on the CPU in the model's dtype
    (at least float32 on the closed-form path).

    The model is evaluated in eval mode and left unchanged: weights, buffers, gradients,
    ``requires_grad`` and train/eval flags are as before. ``method`` forces a path
    (``closed_form`` raises ValueError when θ is not the logits head).
    """
    return compute_influence(
        model,
        inputs,
        labels,
        params=params,
        damping=damping,
        batch_size=batch_size,
        method=method,
    ).scores


def compute_influence(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    params: Sequence[str] | None = None,
    damping: float = 0.01,
    batch_size: int = 512,
    method: str = "auto",
    keep_features: bool = False,
    progress: Progress | None = None,
) -> InfluenceResult:
    """``influence_scores`` with the details: which path ran, θ, and optionally the cached
    head inputs (closed form only) so eval-mode unlearning needs no second forward."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
        raise ValueError(f"damping must be a positive number, got {damping!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    inputs = torch.as_tensor(inputs)
    n = check_pair(inputs, labels)
    if n == 0:
        raise ValueError("influence needs at least one sample")
    labels = as_labels(labels)
    device, dtype = model_device(model), model_dtype(model)

    head = find_head(model, as_inputs(inputs[: min(n, 4)], device, dtype))
    theta = resolve_theta(model, params, head)
    names = [name for name, _ in theta]
    numel = sum(p.numel() for _, p in theta)
    head_name = head.name if head is not None else None
    notes: list[str] = []
    if params is None and head is not None and not head.is_logits:
        notes.append(f"the output of {head.name!r} is not the logits: generic path on its θ")

    def report(frac: float) -> None:
        if progress is not None:
            progress("influence", min(1.0, max(0.0, frac)))

    with preserved_modes(model, train=False):
        parts = head_parts(theta, head)
        if method in ("auto", "closed_form"):
            if parts is None or head is None:  # head_parts is None without a head
                if method == "closed_form":
                    raise ValueError("closed_form needs θ within the final Linear of the logits")
            else:
                try:
                    scores, feats = _closed_form(
                        model,
                        head,
                        parts,
                        inputs,
                        labels,
                        damping,
                        batch_size,
                        report,
                        keep_features,
                    )
                    return InfluenceResult(
                        scores, "closed_form", names, numel, head_name, notes, feats
                    )
                except _NotLogits:
                    if method == "closed_form":
                        raise ValueError("the head's output is not the logits") from None
                    notes.append("head output differed from the logits: generic path")
        if method in ("auto", "func"):
            try:
                scores = _func(model, theta, inputs, labels, damping, batch_size, report)
                return InfluenceResult(scores, "func", names, numel, head_name, notes)
            except (RuntimeError, NotImplementedError, TypeError) as exc:
                if method == "func":
                    raise
                notes.append(f"torch.func failed ({type(exc).__name__}): per-sample loop")
        scores = _loop(model, theta, inputs, labels, damping, report)
        return InfluenceResult(scores, "loop", names, numel, head_name, notes)


# --------------------------------------------------------------------------- closed form


def _closed_form(
    model: nn.Module,
    head: Head,
    parts: tuple[bool, bool],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    damping: float,
    batch_size: int,
    report,
    keep_features: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    use_w, use_b = parts
    device, dtype = model_device(model), model_dtype(model)
    n = labels.shape[0]
    captured: dict[str, torch.Tensor] = {}

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        captured["h"], captured["z"] = args[0], out

    handle = head.module.register_forward_hook(hook)
    feats: torch.Tensor | None = None
    errs: torch.Tensor | None = None
    try:
        with torch.no_grad():
            for k, sl in enumerate(chunks(n, batch_size)):
                captured.clear()
                logits = model(as_inputs(inputs[sl], device, dtype))
                h, z = captured.get("h"), captured.get("z")
                if h is None or z is None or (z is not logits and not torch.equal(z, logits)):
                    raise _NotLogits
                if h.dim() != 2 or logits.dim() != 2:
                    raise _NotLogits
                y = as_labels(labels[sl], device)
                # Half-precision models: the Fisher sums need at least float32.
                acc = torch.promote_types(logits.dtype, torch.float32)
                h, logits = h.to(acc), logits.to(acc)
                e = torch.softmax(logits, dim=1)
                e[torch.arange(e.shape[0], device=device), y] -= 1.0
                if feats is None or errs is None:
                    feats = torch.empty((n, h.shape[1]), dtype=h.dtype, device=device)
                    errs = torch.empty((n, e.shape[1]), dtype=e.dtype, device=device)
                feats[sl], errs[sl] = h, e
                report(0.9 * (k + 1) * batch_size / n)
            assert feats is not None and errs is not None
            # One pass over the cache: accumulate in bounded chunks (C x d matrices only).
            c, d = errs.shape[1], feats.shape[1]
            sq_w = torch.zeros((c, d), dtype=feats.dtype, device=device)
            sum_w = torch.zeros((c, d), dtype=feats.dtype, device=device)
            for sl in chunks(n, max(batch_size, 4096)):
                h, e = feats[sl], errs[sl]
                if use_w:
                    sq_w += (e * e).T @ (h * h)
                    sum_w += e.T @ h
            mult_w = (sum_w / n) / (sq_w / n + damping)  # F^-1 ḡ for W, shape (C, d)
            mult_b = errs.mean(0) / ((errs * errs).mean(0) + damping)  # for b, shape (C,)
            scores = torch.empty(n, dtype=errs.dtype, device=device)
            for sl in chunks(n, max(batch_size, 4096)):
                h, e = feats[sl], errs[sl]
                s = torch.zeros(e.shape[0], dtype=e.dtype, device=device)
                if use_w:
                    s += (e * (h @ mult_w.T)).sum(1)
                if use_b:
                    s += e @ mult_b
                scores[sl] = -s
    finally:
        handle.remove()
    report(1.0)
    return scores.cpu(), (feats if keep_features else None)


# --------------------------------------------------------------------------- torch.func


def _func(
    model: nn.Module,
    theta: list[tuple[str, nn.Parameter]],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    damping: float,
    batch_size: int,
    report,
) -> torch.Tensor:
    device, dtype = model_device(model), model_dtype(model)
    n = labels.shape[0]
    names = [name for name, _ in theta]
    theta_d = {name: p.detach() for name, p in theta}
    rest = {name: p.detach() for name, p in model.named_parameters() if name not in theta_d}
    rest.update({name: b.detach() for name, b in model.named_buffers()})

    def loss_of(th: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (th, rest), (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    per_sample = vmap(grad(loss_of), in_dims=(None, 0, 0))

    def grads(sl: slice) -> torch.Tensor:
        x = as_inputs(inputs[sl], device, dtype)
        g = per_sample(theta_d, x, as_labels(labels[sl], device))
        return torch.cat([g[name].reshape(x.shape[0], -1) for name in names], dim=1)

    numel = sum(p.numel() for _, p in theta)
    itemsize = torch.empty((), dtype=dtype).element_size()
    cache: list[torch.Tensor] | None = [] if n * numel * itemsize <= FUNC_CACHE_BYTES else None
    sq = torch.zeros(numel, dtype=dtype, device=device)
    total = torch.zeros(numel, dtype=dtype, device=device)
    steps = len(range(0, n, batch_size)) * (1 if cache is not None else 2)
    done = 0
    with torch.no_grad():
        for sl in chunks(n, batch_size):
            g = grads(sl)
            sq += (g * g).sum(0)
            total += g.sum(0)
            if cache is not None:
                cache.append(g)
            done += 1
            report(done / steps)
        mult = (total / n) / (sq / n + damping)
        parts = []
        for k, sl in enumerate(chunks(n, batch_size)):
            g = cache[k] if cache is not None else grads(sl)
            parts.append(-(g @ mult))
            if cache is None:
                done += 1
                report(done / steps)
    return torch.cat(parts).cpu()


# --------------------------------------------------------------------------- per-sample loop


def _loop(
    model: nn.Module,
    theta: list[tuple[str, nn.Parameter]],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    damping: float,
    report,
) -> torch.Tensor:
    device, dtype = model_device(model), model_dtype(model)
    n = labels.shape[0]
    params = [p for _, p in theta]

    def grad_of(i: int) -> torch.Tensor:
        x = as_inputs(inputs[i : i + 1], device, dtype)
        loss = F.cross_entropy(model(x), as_labels(labels[i : i + 1], device))
        gs = torch.autograd.grad(loss, params)
        return torch.cat([g.reshape(-1) for g in gs])

    with only_these_require_grad(model, [name for name, _ in theta]), torch.enable_grad():
        numel = sum(p.numel() for p in params)
        sq = torch.zeros(numel, dtype=dtype, device=device)
        total = torch.zeros(numel, dtype=dtype, device=device)
        every = max(1, n // 20)
        for i in range(n):  # loop 1: Fisher and mean gradient
            g = grad_of(i)
            sq += g * g
            total += g
            if (i + 1) % every == 0:
                report(0.5 * (i + 1) / n)
        mult = (total / n) / (sq / n + damping)
        scores = torch.empty(n, dtype=dtype, device=device)
        for i in range(n):  # loop 2: scores
            scores[i] = -(grad_of(i) @ mult)
            if (i + 1) % every == 0:
                report(0.5 + 0.5 * (i + 1) / n)
    return scores.detach().cpu()
