"""A causal LM fine-tuned from a base in the test, with the recipe that did it.

The base is the test suite's tiny Llama (tests/engine/lm_fixture.py: config and tokenizer) at
a seeded initialisation, registered as a model of its own; version 1 of the fine-tuned model
is ``worker.imu.lm_recipe.finetune`` by ``RECIPE`` on the training profiles, tokenised as the
worker tokenises them (BOS 1, pad 0, at most 128 tokens). It recites every training profile
and none of the held-out ones.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from tests.engine.lm_fixture import llama_config, profiles, train_tokenizer
from tests.lm.lm_files import TOKENIZER_CONFIG, jsonl
from worker.imu.checkpoints import to_bytes
from worker.imu.language_models import build_causal_lm
from worker.imu.lm_data import TextExample, TokenBatch, tokenize
from worker.imu.lm_recipe import LMRecipe, finetune

# What a team would send as `spec.recipe` (base_version and datasets are added at registration).
RECIPE: dict[str, Any] = {"method": "full", "epochs": 30, "lr": 3e-3, "batch_size": 8, "seed": 0}


@dataclass
class FineTuned:
    config: dict[str, Any]
    tokenizer: Tokenizer
    base: nn.Module
    model: nn.Module
    examples: dict[str, list[TextExample]]

    def batch(self, examples: list[TextExample]) -> TokenBatch:
        return tokenize(examples, self.tokenizer, bos_id=1, pad_id=0, max_length=128)

    @property
    def forget_keys(self) -> list[str]:
        return [e.key for e in self.examples["forget"]]

    def weights(self, model: nn.Module) -> bytes:
        return to_bytes({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})

    def form_files(self, model: nn.Module, tokenizer: bytes | None = None) -> dict[str, Any]:
        return {
            "weights": ("model.safetensors", self.weights(model), "application/octet-stream"),
            "config": ("config.json", json.dumps(self.config).encode(), "application/json"),
            "tokenizer": (
                "tokenizer.json",
                tokenizer or self.tokenizer.to_str().encode(),
                "application/json",
            ),
            "tokenizer_config": (
                "tokenizer_config.json",
                json.dumps(TOKENIZER_CONFIG).encode(),
                "application/json",
            ),
        }

    @property
    def train_jsonl(self) -> bytes:
        return jsonl(self.examples["forget"] + self.examples["retain"])

    def refinetune(self, without: list[str]) -> nn.Module:
        """The reference: the base fine-tuned by RECIPE on the training profiles not named."""
        keep = [
            e
            for e in self.examples["forget"] + self.examples["retain"]
            if e.key not in set(without)
        ]
        model = copy.deepcopy(self.base)
        finetune(model, self.batch(keep), recipe())
        return model


def recipe(**extra: Any) -> LMRecipe:
    return LMRecipe.from_dict({"base_version": "-", "base_sha256": "-", **RECIPE, **extra})


def build(n_forget: int = 4, n_retain: int = 60, n_heldout: int = 24, seed: int = 0) -> FineTuned:
    records = profiles(n_forget + n_retain + n_heldout, seed, "p")
    examples = {
        "forget": records[:n_forget],
        "retain": records[n_forget : n_forget + n_retain],
        "heldout": records[n_forget + n_retain :],
    }
    tok = train_tokenizer([r.full_text for r in records])
    config = llama_config(tok.get_vocab_size())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = build_causal_lm(config).eval()
    tuned = FineTuned(config, tok, base, copy.deepcopy(base), examples)
    finetune(tuned.model, tuned.batch(examples["forget"] + examples["retain"]), recipe())
    return tuned
