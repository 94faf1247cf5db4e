"""Exact forgetting for causal language models: how version 1 was fine-tuned from its base,
and fine-tuning the base again without the records (ALGORITHM.md §7).

A language model is usually a base model (public, or registered earlier) fine-tuned on the
customer's texts. ``LMRecipe`` is that fine-tune: the base (a registered model version, pinned
by its checkpoint's sha256), full fine-tuning or LoRA (adapters merged into the weights after
training, so the result has the base's state-dict keys), AdamW's settings, the seed of the
data order and of the adapters' initialisation, and which text datasets it read. Fine-tuning
the base again by the same recipe on the retained records is exact for the fine-tuning data:
the result never saw the forgotten records.

``finetune`` is the one trainer: it produces version 1 (tests, bench) and every re-fine-tune.
The loss is the mean token NLL of each record (its completion, or every token with
``loss_tokens="all"``), averaged over a mini-batch.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from worker.imu.canonical import canonical_json
from worker.imu.lm_data import TokenBatch, record_losses

METHODS = ("full", "lora")
LOSS_TOKENS = ("completion", "all")


@dataclass(frozen=True)
class LMRecipe:
    """The fine-tuning run that produced version 1 from ``base_version``.

    base_sha256: the base checkpoint's sha256 (what a re-fine-tune loads, checked). seed:
    ``torch.manual_seed`` before the adapters are attached (LoRA's A matrices) and the
    generator of the data order. datasets: the text train datasets read, in order (ids).
    """

    base_version: str
    base_sha256: str
    epochs: int
    lr: float
    method: str = "full"
    batch_size: int = 8
    weight_decay: float = 0.0
    max_length: int | None = None
    max_grad_norm: float | None = None
    seed: int = 0
    loss_tokens: str = "completion"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None
    optimizer: str = "adamw"
    datasets: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.loss_tokens not in LOSS_TOKENS:
            raise ValueError(f"loss_tokens must be one of {list(LOSS_TOKENS)}")
        if self.optimizer != "adamw":
            raise ValueError(f"optimizer must be 'adamw', got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["datasets"] = list(self.datasets)
        out["lora_targets"] = list(self.lora_targets) if self.lora_targets else None
        if self.method != "lora":  # the adapters' settings mean nothing then
            for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets"):
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LMRecipe:
        values = dict(data)
        values["datasets"] = tuple(values.get("datasets") or ())
        targets = values.get("lora_targets")
        values["lora_targets"] = tuple(targets) if targets else None
        return cls(**values)

    def sha256(self) -> str:
        """The recipe's identity, as receipts cite it: sha256 of its canonical JSON (the
        base's sha256 included, so it pins the base weights too)."""
        return hashlib.sha256(canonical_json(self.to_dict()).encode()).hexdigest()


def is_lm_recipe(recipe: dict[str, Any] | None) -> bool:
    """A stored recipe of a causal LM (it names a base) rather than a classifier's."""
    return bool(recipe) and "base_version" in (recipe or {})


def training_batch(batch: TokenBatch, loss_tokens: str) -> TokenBatch:
    """``batch`` scored on what the recipe trains on: the completion as tokenised, or every
    predicted token of the record (prompt included) with ``"all"``."""
    if loss_tokens == "completion":
        return batch
    scored = torch.zeros_like(batch.scored)
    for i in range(len(batch)):
        hits = batch.scored[i].nonzero()
        if len(hits):
            scored[i, 1 : int(hits[-1]) + 1] = True
    return TokenBatch(batch.keys, batch.texts, batch.ids, scored, batch.prefix_len, batch.pad_id)


def _train(
    model: nn.Module,
    params: list[nn.Parameter],
    batch: TokenBatch,
    recipe: LMRecipe,
    on_step: Callable[[float], None] | None,
) -> list[float]:
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    gen = torch.Generator().manual_seed(recipe.seed)
    losses: list[float] = []
    steps = math.ceil(len(batch) / recipe.batch_size)
    model.train()
    for epoch in range(1, recipe.epochs + 1):
        total, count = 0.0, 0
        order = torch.randperm(len(batch), generator=gen).split(recipe.batch_size)
        for step, idx in enumerate(order, 1):
            loss = record_losses(model, batch.take(idx))[0].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            if on_step is not None:  # may raise: a cancel stops the run mid-epoch
                on_step((epoch - 1 + step / steps) / recipe.epochs)
        mean = total / max(1, count)
        if not math.isfinite(mean):
            raise ValueError(f"the fine-tune diverged at epoch {epoch} (loss {mean})")
        losses.append(mean)
    opt.zero_grad(set_to_none=True)
    model.eval()
    return losses


def finetune(
    model: nn.Module,
    batch: TokenBatch,
    recipe: LMRecipe,
    *,
    on_step: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` (the base, changed in place) by ``recipe`` on ``batch``; JSON
    stats. ``on_step(fraction of the run done)`` after every optimizer step. With LoRA the
    adapters are merged into the weights at the end and removed."""
    train = training_batch(batch, recipe.loss_tokens)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        if recipe.method == "lora":
            from worker.imu.lm_lora import lora_attached

            with lora_attached(
                model,
                recipe.lora_r,
                recipe.lora_alpha,
                recipe.lora_targets,
                dropout=recipe.lora_dropout,
            ) as (adapted, names):
                named = dict(adapted.named_parameters())
                params = [named[n] for n in names]
                losses = _train(adapted, params, train, recipe, on_step)
            trained = sum(p.numel() for p in params)
        else:
            params = [p for p in model.parameters() if p.requires_grad]
            losses = _train(model, params, train, recipe, on_step)
            trained = sum(p.numel() for p in params)
    return {
        "method": "retrain",
        "finetune": recipe.method,
        "n_train": len(batch),
        "epochs": recipe.epochs,
        "trained_parameters": int(trained),
        "loss_per_epoch": [round(v, 6) for v in losses],
        "train_seconds": round(time.perf_counter() - start, 3),
        "recipe": recipe.to_dict(),
        "recipe_sha256": recipe.sha256(),
    }


__all__ = ["LOSS_TOKENS", "METHODS", "LMRecipe", "finetune", "is_lm_recipe", "training_batch"]
