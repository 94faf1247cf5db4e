"""The LM fine-tuning recipe (worker.imu.lm_recipe): deterministic, LoRA merged into a plain
model with the base's keys, progress after every step (where a cancel stops it), the recipe's
identity pinning the base."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.engine.lm_fixture import llama_config, profiles, train_tokenizer
from worker.imu.language_models import build_causal_lm
from worker.imu.lm_data import TokenBatch, tokenize
from worker.imu.lm_recipe import LMRecipe, finetune, training_batch


@pytest.fixture(scope="module")
def data() -> tuple[dict, TokenBatch]:
    records = profiles(12, seed=3, prefix="r")
    tok = train_tokenizer([r.full_text for r in records], vocab_size=400)
    return llama_config(tok.get_vocab_size(), width=32, layers=1), tokenize(records, tok, bos_id=1)


def _base(config: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_causal_lm(config).eval()


def _recipe(**extra: object) -> LMRecipe:
    values = {
        "base_version": "v",
        "base_sha256": "0" * 64,
        "epochs": 2,
        "lr": 1e-2,
        "batch_size": 4,
        **extra,
    }
    return LMRecipe.from_dict(values)


def test_lora_is_merged_into_a_plain_model_and_runs_are_repeatable(data) -> None:
    config, batch = data
    base = _base(config)
    recipe = _recipe(method="lora", lora_r=4, lora_alpha=8)
    runs = []
    for _ in range(2):
        model = copy.deepcopy(base)
        stats = finetune(model, batch, recipe)
        runs.append(model.state_dict())
    assert set(runs[0]) == set(base.state_dict())  # no adapter left behind
    assert not any(".lora_" in name for name, _ in model.named_parameters())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # seeded: the same
    moved = [k for k, v in base.state_dict().items() if not torch.equal(v, runs[0][k])]
    assert moved and all("proj" in k for k in moved)  # only the adapted layers changed
    assert stats["finetune"] == "lora" and len(stats["loss_per_epoch"]) == 2
    assert stats["trained_parameters"] < sum(p.numel() for p in base.parameters()) / 4
    assert stats["recipe_sha256"] == recipe.sha256()


def test_progress_after_every_step_and_a_raise_stops_mid_epoch(data) -> None:
    config, batch = data
    seen: list[float] = []

    class Stop(Exception):
        pass

    def on_step(done: float) -> None:
        seen.append(done)
        if len(seen) == 2:
            raise Stop

    with pytest.raises(Stop):
        finetune(_base(config), batch, _recipe(epochs=5), on_step=on_step)
    assert seen == pytest.approx([1 / 15, 2 / 15])  # 12 records at batch 4: 3 steps per epoch
    full: list[float] = []
    finetune(_base(config), batch, _recipe(epochs=2), on_step=full.append)
    assert len(full) == 6 and full[-1] == pytest.approx(1.0)


def test_the_recipe_pins_the_base_and_its_loss_tokens(data) -> None:
    _, batch = data
    a, b = _recipe(), _recipe(base_sha256="1" * 64)
    assert a.sha256() != b.sha256()
    assert "lora_r" not in a.to_dict() and LMRecipe.from_dict(a.to_dict()) == a
    lora = _recipe(method="lora", lora_targets=["q_proj"])
    assert LMRecipe.from_dict(lora.to_dict()) == lora
    with pytest.raises(ValueError, match="method"):
        _recipe(method="qlora")
    everything = training_batch(batch, "all")
    assert int(everything.scored.sum()) > int(batch.scored.sum())  # the prompt counts too
    assert not everything.scored[:, 0].any()
    assert training_batch(batch, "completion") is batch
