"""LoRA θ for causal-LM unlearning (optional; needs ``peft``, part of the ``lm`` extra).

With ``lora_rank`` r > 0, low-rank adapters (A: r × in, B: out × r, B = 0 at the start, so
the model is unchanged until the first step) are attached to the named linear layers, θ is
the adapters only (influence, weights and the calibrated ascent run on them unchanged), and
on success the adapters are merged into the base weights and removed: the result is a plain
model with the state-dict keys it was registered with. On failure they are removed unmerged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@contextmanager
def lora_attached(
    model: nn.Module,
    rank: int,
    alpha: int,
    targets: Sequence[str] | None,
    *,
    dropout: float = 0.0,
) -> Iterator[tuple[nn.Module, list[str]]]:
    """(the adapted model, the adapter parameter names) while the block runs; ``dropout``
    on the adapters' input (fine-tuning recipes; unlearning keeps 0)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - the lm extra installs peft
        raise ValueError("lora_rank needs peft (pip install 'lethe-unlearning[lm]')") from exc
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        target_modules=list(targets or DEFAULT_TARGETS),
    )
    try:
        adapted = get_peft_model(model, config)
    except ValueError as exc:  # e.g. no module matches the targets
        raise ValueError(f"lora_targets: {exc}") from None
    names = [name for name, _ in adapted.named_parameters() if ".lora_" in name]
    merged = False
    try:
        yield adapted, names
        adapted.merge_and_unload()
        merged = True
    finally:
        if not merged:
            adapted.unload()
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, True))
