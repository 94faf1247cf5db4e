"""Logits of whole record sets for one model state, each set through the model once.

An evaluation asks for the same sets many times (accuracies, the SVC attack, loss AUCs,
per-class accuracy, the membership test), and some sets are rows of others (the eval
policy half is part of the membership test's non-members; the test's forget sample is
part of the forget set). Sets are keyed by content, so a copy of a tensor hits too, and a
cache can be carried to an identical model state (the next job's "before" is the previous
job's released "after"): ``SetOutputs(model, carry=earlier.entries())``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from worker.imu.checks import model_logits

SetKey = tuple[tuple[int, ...], str, bytes]


def set_key(inputs: torch.Tensor) -> SetKey:
    """Shape, dtype and a digest of the bytes: equal keys mean equal tensors."""
    x = torch.as_tensor(inputs).detach().cpu().contiguous()
    raw = x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b""
    return tuple(x.shape), str(x.dtype), hashlib.blake2b(raw, digest_size=16).digest()


class SetOutputs:
    """``outputs(x)`` -> logits of every row of ``x`` (eval mode, the model's dtype, on the
    CPU); ``forwards`` counts the passes through the model (what the cache saves)."""

    def __init__(
        self,
        model: nn.Module,
        batch_size: int = 512,
        carry: dict[SetKey, torch.Tensor] | None = None,
    ) -> None:
        """``carry``: logits computed by a model state that computes the same function (the
        checkpoint ``model`` was loaded from)."""
        self.model = model
        self.batch_size = batch_size
        self.forwards = 0
        self._logits: dict[SetKey, torch.Tensor] = dict(carry or {})

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        key = set_key(inputs)
        hit = self._logits.get(key)
        if hit is None:
            forward = model_logits(self.model, inputs, self.batch_size, as_float=False)
            hit = self._logits[key] = forward().cpu()
            self.forwards += 1
        return hit

    def derive(
        self, part: torch.Tensor, whole: torch.Tensor, rows: Sequence[int] | torch.Tensor
    ) -> None:
        """Declare ``part == whole[rows]``: its logits are taken from the whole set's."""
        key = set_key(part)
        if key not in self._logits:
            self._logits[key] = self(whole)[torch.as_tensor(rows, dtype=torch.long)]

    def entries(self) -> dict[SetKey, torch.Tensor]:
        """The cached logits, to carry to another object of the same model state."""
        return dict(self._logits)

    def __len__(self) -> int:
        return len(self._logits)


__all__ = ["SetKey", "SetOutputs", "set_key"]
