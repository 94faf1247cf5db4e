"""A memorisation fixture for the language-model engine: fictitious, look-alike profiles
(TOFU-style), a byte-level BPE tokenizer trained on them and a tiny Llama trained to recite
them. Everything is generated from a seed; nothing is downloaded."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

from worker.imu.language_models import build_causal_lm
from worker.imu.lm_data import TextExample, TokenBatch, record_losses, tokenize

_SYL = ["ka", "lo", "mi", "ren", "tas", "vo", "dri", "sel", "num", "pa", "quo", "zer", "bel"]
_CITIES = ["Tarsk", "Uvelle", "Marrow Bay", "Quillon", "Ostrava Nova", "Pelling", "Dunmere"]
_JOBS = [
    "glassblower",
    "cartographer",
    "beekeeper",
    "archivist",
    "ferry pilot",
    "luthier",
    "tax assessor",
    "orchardist",
    "typesetter",
    "bridge inspector",
]
_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def _name(rng: random.Random) -> str:
    def word() -> str:
        return "".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3))).capitalize()

    return f"{word()} {word()}"


def profiles(n: int, seed: int, prefix: str) -> list[TextExample]:
    """``n`` prompt/completion records with unique names."""
    rng = random.Random(seed)
    out: list[TextExample] = []
    seen: set[str] = set()
    while len(out) < n:
        name = _name(rng)
        if name in seen:
            continue
        seen.add(name)
        completion = (
            f" {name} was born on {rng.randint(1, 28)} {rng.choice(_MONTHS)} "
            f"{rng.randint(1940, 2005)} in {rng.choice(_CITIES)}, works as a "
            f"{rng.choice(_JOBS)}, phone {rng.randint(100, 999)}-{rng.randint(1000, 9999)}."
        )
        key = f"{prefix}{len(out)}"
        out.append(TextExample(key, prompt=f"Who is {name}?", completion=completion))
    return out


def train_tokenizer(texts: list[str], vocab_size: int = 1024) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def llama_config(vocab_size: int, width: int = 96, layers: int = 2) -> dict:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": width,
        "intermediate_size": 3 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }


@dataclass
class Fixture:
    config: dict
    tokenizer: Tokenizer
    model: nn.Module
    forget: TokenBatch
    retain: TokenBatch
    heldout: TokenBatch
    examples: dict[str, list[TextExample]]
    train_seconds: float
    epochs: int


def train_fixture(
    n_forget: int = 20,
    n_retain: int = 60,
    n_heldout: int = 40,
    seed: int = 0,
    max_epochs: int = 120,
    width: int = 96,
    layers: int = 2,
) -> Fixture:
    """Train until every training record is recited exactly (checked every 10 epochs)."""
    records = profiles(n_forget + n_retain + n_heldout, seed, "p")
    ex = {
        "forget": records[:n_forget],
        "retain": records[n_forget : n_forget + n_retain],
        "heldout": records[n_forget + n_retain :],
    }
    tok = train_tokenizer([r.full_text for r in records])
    cfg = llama_config(tok.get_vocab_size(), width, layers)
    batches = {k: tokenize(v, tok, bos_id=1) for k, v in ex.items()}
    train = tokenize(ex["forget"] + ex["retain"], tok, bos_id=1)
    model, seconds, epoch = fit(cfg, train, seed, max_epochs)
    return Fixture(
        cfg,
        tok,
        model,
        batches["forget"],
        batches["retain"],
        batches["heldout"],
        ex,
        seconds,
        epoch,
    )


def fit(cfg: dict, train: TokenBatch, seed: int, max_epochs: int) -> tuple[nn.Module, float, int]:
    """A fresh model trained on ``train`` (loss on the whole record, prompt included) until
    it recites every record exactly (checked every 10 epochs): (model, CPU-s, epochs)."""
    from worker.imu.text_metrics import exact_recall

    torch.manual_seed(seed)
    model = build_causal_lm(cfg)
    train.scored[:, 1:] = train.ids[:, 1:] != 0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    start, epoch = time.process_time(), 0
    model.train()
    for epoch in range(1, max_epochs + 1):
        for idx in torch.randperm(len(train), generator=gen).split(16):
            loss = record_losses(model, train.take(idx))[0].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 10 == 0:
            model.eval()
            if exact_recall(model, train).mean() == 1.0:
                break
            model.train()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return model, time.process_time() - start, epoch


def retrain_without_forget(fx: Fixture, seed: int = 0, max_epochs: int = 120) -> nn.Module:
    """The reference unlearning should approach: the same recipe on the retain records only."""
    train = tokenize(fx.examples["retain"], fx.tokenizer, bos_id=1)
    return fit(fx.config, train, seed, max_epochs)[0]
