"""The memorisation fixture (tests/engine/lm_fixture.py) as the files a team registers:
model.safetensors (tied lm_head left out, as save_pretrained writes it), config.json,
tokenizer.json, tokenizer_config.json, and JSONL datasets (train = forget + retain records,
eval = held-out profiles, member probe = the retain records)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tests.engine.lm_fixture import Fixture
from worker.imu.checkpoints import to_bytes
from worker.imu.lm_data import TextExample

TOKENIZER_CONFIG = {"add_bos_token": True, "bos_token": "<s>", "pad_token": "<pad>"}


def jsonl(examples: list[TextExample]) -> bytes:
    rows = [{"id": e.key, "prompt": e.prompt, "completion": e.completion} for e in examples]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@dataclass
class LMFiles:
    fixture: Fixture
    weights: bytes
    config: bytes
    tokenizer: bytes
    tokenizer_config: bytes
    train: bytes
    eval: bytes
    probe: bytes

    @property
    def forget_keys(self) -> list[str]:
        return [e.key for e in self.fixture.examples["forget"]]

    def form_files(self, **replace: bytes) -> dict[str, tuple[str, bytes, str]]:
        parts = {
            "weights": ("model.safetensors", self.weights, "application/octet-stream"),
            "config": ("config.json", self.config, "application/json"),
            "tokenizer": ("tokenizer.json", self.tokenizer, "application/json"),
            "tokenizer_config": (
                "tokenizer_config.json",
                self.tokenizer_config,
                "application/json",
            ),
        }
        for field, content in replace.items():
            parts[field] = (parts[field][0], content, parts[field][2])
        return parts


def lm_files(fx: Fixture) -> LMFiles:
    state = {k: v for k, v in fx.model.state_dict().items() if k != "lm_head.weight"}
    ex = fx.examples
    return LMFiles(
        fx,
        to_bytes(state),
        json.dumps(fx.config).encode(),
        fx.tokenizer.to_str().encode(),
        json.dumps(TOKENIZER_CONFIG).encode(),
        jsonl(ex["forget"] + ex["retain"]),
        jsonl(ex["heldout"]),
        jsonl(ex["retain"]),
    )


def spec(name: str, **extra: Any) -> str:
    return json.dumps({"name": name, "architecture": "causal_lm", "arch_kwargs": {}, **extra})
