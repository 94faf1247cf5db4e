"""Small helpers shared by the engine modules: devices, dtypes, modes, θ selection, head."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

Progress = Callable[[str, float], None]


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's first floating parameter (float32 when none)."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def as_inputs(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Move a batch to the model; floating inputs take the model's dtype, others (token ids)
    keep theirs."""
    x = torch.as_tensor(x)
    if x.is_floating_point():
        return x.to(device=device, dtype=dtype, non_blocking=True)
    return x.to(device=device, non_blocking=True)


def as_labels(y: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.dim() != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got {y.dtype}")
    y = y.long()
    return y if device is None else y.to(device, non_blocking=True)


def check_pair(inputs: torch.Tensor, labels: torch.Tensor, what: str = "inputs") -> int:
    n = int(torch.as_tensor(inputs).shape[0]) if torch.as_tensor(inputs).dim() else 0
    if n != int(torch.as_tensor(labels).shape[0]):
        raise ValueError(f"{what}: {n} inputs but {int(torch.as_tensor(labels).shape[0])} labels")
    return n


@contextlib.contextmanager
def preserved_modes(model: nn.Module, train: bool | None = None) -> Iterator[None]:
    """Restore every submodule's train/eval flag on exit (they may differ per module)."""
    flags = [(m, m.training) for m in model.modules()]
    if train is not None:
        model.train(train)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def only_these_require_grad(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """θ trainable, everything else frozen; the original flags come back on exit."""
    wanted = set(names)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in wanted)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def frozen_norm_statistics(model: nn.Module, frozen: bool = True) -> Iterator[None]:
    """Train-mode BatchNorm still normalises with batch statistics, but its running statistics
    stay as they are (momentum 0; the batch counter is put back on exit).

    Checks and the release policy run in eval mode, on the running statistics. Steps on
    batches of the forget set, one class for a class-wise request, would pull those toward
    the forget set's and cost every other class accuracy whatever the step size, so halving
    the step after a guard failure could not undo it (ALGORITHM.md §5)."""
    norms = [m for m in batchnorm_layers(model) if m.track_running_stats] if frozen else []
    saved = [(m, m.momentum, m.num_batches_tracked) for m in norms]
    counts = [None if c is None else c.clone() for _, _, c in saved]
    try:
        for m in norms:
            m.momentum = 0.0
        yield
    finally:
        for (m, momentum, tracked), count in zip(saved, counts, strict=True):
            m.momentum = momentum
            if tracked is not None and count is not None:
                tracked.copy_(count)


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA device indices ``torch.random.fork_rng`` must fork for ``device``."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def ascent_term(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample quantity the unlearning steps raise (ALGORITHM.md §5).

    ``ce``: the cross-entropy. ``margin``: mean of the other logits minus the true-class
    logit. Raising the cross-entropy raises each other logit in proportion to its softmax
    probability, mostly the nearest competitor's, and for a linear head it does so on every
    input sharing the forget set's features; the margin raises all other logits equally, so
    the ranking among the remaining classes is left as it was."""
    if kind == "ce":
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    true = logits.gather(1, labels[:, None])[:, 0]
    others = (logits.sum(1) - true) / max(1, logits.shape[1] - 1)
    return others - true


def epoch_batches(order: torch.Tensor, batch_size: int, avoid_single: bool) -> list[torch.Tensor]:
    """Mini-batches of ``order``, each sample exactly once; with ``avoid_single`` a trailing
    batch of one sample joins the previous one (train-mode BatchNorm cannot normalise one)."""
    parts = list(torch.split(order, batch_size))
    if avoid_single and len(parts) > 1 and parts[-1].numel() == 1:
        last = parts.pop()  # popped first, so the join lands on the batch before it
        parts[-1] = torch.cat([parts[-1], last])
    return parts


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@dataclass
class Head:
    """The last ``nn.Linear`` of a forward pass and whether its output is the logits."""

    name: str
    module: nn.Linear
    is_logits: bool


def find_head(model: nn.Module, probe: torch.Tensor) -> Head | None:
    """Run one eval-mode forward on ``probe`` and find the Linear whose output is the logits.

    The check is empirical, not structural: a Linear followed by a temperature, a second
    call of the same module or any other post-processing is not the logits layer, and the
    fast path then must not be used.
    """
    linears: dict[nn.Module, str] = {
        m: n for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    if not linears:
        return None
    calls: list[tuple[nn.Module, torch.Tensor | None, torch.Tensor]] = []

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        calls.append((mod, args[0] if args else None, out))

    handles = [m.register_forward_hook(hook) for m in linears]
    try:
        with preserved_modes(model, train=False), torch.no_grad():
            logits = model(probe)
    finally:
        for h in handles:
            h.remove()
    if not calls:
        last = list(linears)[-1]
        assert isinstance(last, nn.Linear)
        return Head(linears[last], last, False)
    mod, inp, out = calls[-1]
    once = sum(1 for c in calls if c[0] is mod) == 1
    is_logits = (
        once
        and isinstance(logits, torch.Tensor)
        and isinstance(inp, torch.Tensor)
        and logits.dim() == 2
        and inp.dim() == 2
        and out.shape == logits.shape
        and torch.equal(out, logits)
    )
    assert isinstance(mod, nn.Linear)
    return Head(linears[mod], mod, bool(is_logits))


def resolve_theta(
    model: nn.Module, params: Sequence[str] | None, head: Head | None
) -> list[tuple[str, nn.Parameter]]:
    """θ as (name, parameter) pairs: the head's weight and bias, or the parameters whose
    dotted name equals a prefix or starts with ``prefix + '.'``."""
    named = list(model.named_parameters())
    if params is None:
        if head is None:
            raise ValueError("the model has no nn.Linear; pass params (parameter-name prefixes)")
        prefix = head.name + "." if head.name else ""
        chosen = [(n, p) for n, p in named if n in (prefix + "weight", prefix + "bias")]
        if not chosen:
            raise ValueError(f"the head {head.name!r} has no parameters")
        return chosen
    return by_prefixes(named, params)


def by_prefixes(
    named: Sequence[tuple[str, nn.Parameter]], prefixes: Sequence[str]
) -> list[tuple[str, nn.Parameter]]:
    """The parameters whose dotted name equals a prefix or starts with ``prefix + '.'``."""
    chosen: list[tuple[str, nn.Parameter]] = []
    for prefix in prefixes:
        hits = [(n, p) for n, p in named if n == prefix or n.startswith(prefix + ".")]
        if not hits:
            raise ValueError(f"params: no parameter matches the prefix {prefix!r}")
        chosen += [h for h in hits if h[0] not in {c[0] for c in chosen}]
    # Keep the model's own order: it makes results independent of how prefixes are listed.
    order = {n: i for i, (n, _) in enumerate(named)}
    return sorted(chosen, key=lambda item: order[item[0]])


def head_parts(
    theta: Sequence[tuple[str, nn.Parameter]], head: Head | None
) -> tuple[bool, bool] | None:
    """(uses weight, uses bias) when θ lies within the logits head, else None."""
    if head is None or not head.is_logits:
        return None
    prefix = head.name + "." if head.name else ""
    names = {n for n, _ in theta}
    allowed = {prefix + "weight"} | ({prefix + "bias"} if head.module.bias is not None else set())
    if not names or not names <= allowed:
        return None
    return prefix + "weight" in names, prefix + "bias" in names
