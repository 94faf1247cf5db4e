"""Text records as token batches, and the per-record loss of a causal LM.

A record is either a plain text (loss on every predicted token; the extraction prefix is its
first ``prefix_fraction`` of tokens) or a prompt/completion pair (loss on the completion only;
the prompt is the prefix). Sequences are right-padded and the model is called without an
attention mask: under causal attention a position never sees the padding after it, so the
logits of real tokens are exactly those of the unpadded sequence — and no data-dependent mask
logic runs inside ``vmap``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from worker.imu._util import model_device

if TYPE_CHECKING:
    from tokenizers import Tokenizer


@dataclass(frozen=True)
class TextExample:
    """What the engine needs of a record: the text, or a prompt and its completion."""

    key: str
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None

    @property
    def full_text(self) -> str:
        return self.text if self.text is not None else f"{self.prompt}{self.completion}"


@dataclass
class TokenBatch:
    """Right-padded token ids (n, L); ``scored`` marks the target positions t whose token
    ids[:, t] is predicted from ids[:, :t] and counts in the loss (the completion / text);
    ``prefix_len`` is the number of prefix tokens (the extraction prompt) per record."""

    keys: list[str]
    texts: list[str]
    ids: torch.Tensor  # int64 (n, L)
    scored: torch.Tensor  # bool (n, L); position 0 is never scored
    prefix_len: torch.Tensor  # int64 (n,)
    pad_id: int

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, idx: torch.Tensor | Sequence[int]) -> TokenBatch:
        """A sub-batch, trimmed to its longest sequence."""
        idx = torch.as_tensor(idx, dtype=torch.int64)
        ids, scored = self.ids[idx], self.scored[idx]
        used = int((ids != self.pad_id).sum(1).max()) if len(idx) else 0
        width = max(used, int(scored.nonzero()[:, 1].max()) + 1 if scored.any() else 1)
        return TokenBatch(
            [self.keys[i] for i in idx.tolist()],
            [self.texts[i] for i in idx.tolist()],
            ids[:, :width],
            scored[:, :width],
            self.prefix_len[idx],
            self.pad_id,
        )


def tokenize(
    examples: Sequence[TextExample],
    tokenizer: Tokenizer,
    *,
    max_length: int = 512,
    prefix_fraction: float = 0.5,
    bos_id: int | None = None,
    pad_id: int = 0,
) -> TokenBatch:
    """Tokenise prompt and completion separately so the boundary is exact; sequences longer
    than ``max_length`` keep their beginning (the part an extraction prompt starts from)."""
    if not examples:
        raise ValueError("no text records")
    rows: list[list[int]] = []
    prefixes: list[int] = []
    for ex in examples:
        head = [bos_id] if bos_id is not None else []
        if ex.text is not None:
            toks = head + tokenizer.encode(ex.text, add_special_tokens=False).ids
            if len(toks) < 2:
                raise ValueError(f"record {ex.key!r}: fewer than two tokens")
            body = len(toks) - len(head)
            split = len(head) + max(1, min(body - 1, math.floor(prefix_fraction * body)))
        else:
            prompt = head + tokenizer.encode(ex.prompt or "", add_special_tokens=False).ids
            completion = tokenizer.encode(ex.completion or "", add_special_tokens=False).ids
            if not prompt or not completion:
                raise ValueError(f"record {ex.key!r}: empty prompt or completion after tokenising")
            toks, split = prompt + completion, len(prompt)
        if split >= max_length:
            raise ValueError(f"record {ex.key!r}: prefix longer than max_length {max_length}")
        rows.append(toks[:max_length])
        prefixes.append(split)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    scored = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, split) in enumerate(zip(rows, prefixes, strict=True)):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        # Plain texts are scored on every predicted token; pairs on the completion.
        first = 1 if examples[i].text is not None else split
        scored[i, first : len(row)] = True
    return TokenBatch(
        [ex.key for ex in examples],
        [ex.full_text for ex in examples],
        ids,
        scored,
        torch.tensor(prefixes, dtype=torch.int64),
        pad_id,
    )


def lm_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits (n, L, V) with no attention mask (see the module docstring) and no cache."""
    out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, :t]) at every t ≥ 1, shape (n, L); position 0 is 0."""
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return F.pad(picked, (1, 0))


def nll_from_logits(
    logits: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean token NLL per record, scored token count per record)."""
    lp = token_logprobs(logits, ids)
    mask = scored.to(lp.dtype)
    count = mask.sum(-1)
    return -(lp * mask).sum(-1) / count.clamp(min=1), count


def record_losses(model: nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-record mean token NLL (differentiable) and token counts."""
    device = model_device(model)
    ids, scored = batch.ids.to(device), batch.scored.to(device)
    return nll_from_logits(lm_logits(model, ids), ids, scored)
