"""Influence scores for causal LMs (ALGORITHM.md §2 with ℓ_i = mean token NLL of record i).

Per-sample gradients g_i = ∇θ ℓ_i come from ``torch.func`` (vmap over grad of a functional
call) in chunks whose gradient block stays under ``chunk_bytes``. When the whole n×P matrix
fits ``cache_bytes`` it is kept between the two passes (F and ḡ first, then g_iᵀF⁻¹ḡ);
otherwise the second pass recomputes the chunks (streaming: memory is one chunk, time ~2×).
``per_sample_grads_loop`` is the reference (one backward per record).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from worker.imu._util import Progress, by_prefixes, model_device, preserved_modes
from worker.imu.lm_data import TokenBatch, nll_from_logits, record_losses

CHUNK_BYTES = 256 << 20  # one chunk of per-sample gradients
CACHE_BYTES = 512 << 20  # the whole n×P matrix, kept between the passes when below this


def lm_theta(model: nn.Module, params: Sequence[str] | None) -> list[tuple[str, nn.Parameter]]:
    """θ by parameter-name prefix; default: every parameter of the decoder blocks.

    The default leaves out the token embedding (tied to the output layer in most small LMs:
    every token of every text flows through it) and the final norm."""
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if ".layers." in n or ".h." in n]
        if not chosen:
            raise ValueError("no decoder-block parameters found; pass params (name prefixes)")
        return chosen
    return by_prefixes(named, params)


def _functional_loss(model: nn.Module, theta: list[tuple[str, nn.Parameter]]):
    names = {n for n, _ in theta}
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    rest.update({n: b.detach() for n, b in model.named_buffers()})

    def loss_of(th: dict[str, torch.Tensor], ids: torch.Tensor, scored: torch.Tensor):
        out = functional_call(
            model, (th, rest), args=(), kwargs={"input_ids": ids[None], "use_cache": False}
        )
        return nll_from_logits(out.logits, ids[None], scored[None])[0][0]

    return loss_of


def per_sample_grads(
    model: nn.Module, batch: TokenBatch, theta: list[tuple[str, nn.Parameter]]
) -> torch.Tensor:
    """(n, P) gradients of each record's mean NLL w.r.t. θ (flattened in θ's order)."""
    device = model_device(model)
    theta_d = {n: p.detach() for n, p in theta}
    fn = vmap(grad(_functional_loss(model, theta)), in_dims=(None, 0, 0), randomness="same")
    with preserved_modes(model, train=False):
        g = fn(theta_d, batch.ids.to(device), batch.scored.to(device))
    return torch.cat([g[n].reshape(len(batch), -1) for n, _ in theta], dim=1)


def per_sample_grads_loop(
    model: nn.Module, batch: TokenBatch, theta: list[tuple[str, nn.Parameter]]
) -> torch.Tensor:
    """The reference: one forward and backward per record."""
    params = [p for _, p in theta]
    rows = []
    with preserved_modes(model, train=False), torch.enable_grad():
        for i in range(len(batch)):
            loss = record_losses(model, batch.take([i]))[0][0]
            gs = torch.autograd.grad(loss, params)
            rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


@dataclass
class LMInfluence:
    scores: torch.Tensor  # (n,) float64 on the CPU
    theta: list[str]
    theta_numel: int
    chunk: int
    streamed: bool  # True when the second pass recomputed the gradients
    notes: list[str] = field(default_factory=list)


def lm_influence(
    model: nn.Module,
    batch: TokenBatch,
    *,
    params: Sequence[str] | None = None,
    damping: float = 0.01,
    chunk_bytes: int = CHUNK_BYTES,
    cache_bytes: int = CACHE_BYTES,
    progress: Progress | None = None,
) -> LMInfluence:
    """I_i = −g_iᵀF⁻¹ḡ with the diagonal Fisher F = mean(g⊙g) + λ; model left unchanged."""
    theta = lm_theta(model, params)
    n = len(batch)
    numel = sum(p.numel() for _, p in theta)
    itemsize = theta[0][1].element_size()
    if numel * itemsize > chunk_bytes:
        raise ValueError(
            f"θ has {numel} parameters: one per-sample gradient ({numel * itemsize} bytes) "
            f"exceeds the chunk bound of {chunk_bytes} bytes; choose fewer params"
        )
    chunk = max(1, min(n, chunk_bytes // (numel * itemsize)))
    keep = n * numel * itemsize <= cache_bytes
    device = model_device(model)
    acc = torch.float64 if device.type == "cpu" else torch.float32
    sq = torch.zeros(numel, dtype=acc, device=device)
    total = torch.zeros(numel, dtype=acc, device=device)
    cache: list[torch.Tensor] = []
    slices = [list(range(s, min(n, s + chunk))) for s in range(0, n, chunk)]
    steps = len(slices) * (1 if keep else 2)

    def report(done: int) -> None:
        if progress is not None:
            progress("influence", done / steps)

    with torch.no_grad():
        for k, idx in enumerate(slices):
            g = per_sample_grads(model, batch.take(idx), theta).to(acc)
            sq += (g * g).sum(0)
            total += g.sum(0)
            if keep:
                cache.append(g)
            report(k + 1)
        mult = (total / n) / (sq / n + damping)
        parts = []
        for k, idx in enumerate(slices):
            g = cache[k] if keep else per_sample_grads(model, batch.take(idx), theta).to(acc)
            parts.append(-(g @ mult))
            if not keep:
                report(len(slices) + k + 1)
    return LMInfluence(
        torch.cat(parts).double().cpu(), [n for n, _ in theta], numel, chunk, not keep
    )
