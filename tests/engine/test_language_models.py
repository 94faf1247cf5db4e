"""The causal-LM engine on a tiny Llama that memorised fictitious profiles in this session:
registration checks, per-sample gradients, text metrics and the calibrated controller."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.engine.lm_fixture import Fixture, train_fixture
from worker.imu.checkpoints import read_header, to_bytes
from worker.imu.language_models import (
    build_causal_lm,
    build_config,
    check_causal_lm,
    check_tokenizer,
    load_causal_lm,
    load_tokenizer,
    require_match,
    validate_tokenizer_config,
)
from worker.imu.lm_data import record_losses
from worker.imu.lm_influence import lm_influence, lm_theta, per_sample_grads, per_sample_grads_loop
from worker.imu.lm_unlearn import LMUnlearnConfig, unlearn_lm
from worker.imu.text_checks import TextChecks
from worker.imu.text_metrics import evaluate_lm


@pytest.fixture(scope="session")
def fx() -> Fixture:
    return train_fixture()


@pytest.fixture(scope="session")
def saved(fx: Fixture) -> tuple[bytes, bytes]:
    """(model.safetensors, tokenizer.json) as save_pretrained writes them: tied lm_head left out."""
    state = {k: v for k, v in fx.model.state_dict().items() if k != "lm_head.weight"}
    return to_bytes(state), fx.tokenizer.to_str().encode()


def test_fixture_memorised_every_training_record(fx: Fixture) -> None:
    ev = evaluate_lm(fx.model, fx.forget, fx.heldout, fx.retain)
    assert ev["forget"]["exact_recall"] == 1.0
    assert ev["member_probe"]["exact_recall"] == 1.0
    assert ev["forget"]["token_accuracy"] == 1.0
    assert ev["heldout"]["exact_recall"] == 0.0  # unseen profiles cannot be recited
    assert ev["forget"]["perplexity"] < 1.2 < 5.0 < ev["heldout"]["perplexity"]
    for name in ("loss_auc", "zlib_auc", "min_k_auc"):
        assert ev["attacks"][name] > 0.95, name


def test_real_checkpoint_is_accepted_and_reloads(fx: Fixture, saved: tuple[bytes, bytes]) -> None:
    weights, tok_json = saved
    header = read_header(weights)
    assert "lm_head.weight" not in header
    result = check_causal_lm(json.dumps(fx.config).encode(), header)
    assert result.ok, result.describe()
    from safetensors.torch import load

    model = load_causal_lm(fx.config, load(weights))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survived
    tok = load_tokenizer(tok_json)
    check_tokenizer(fx.config, tok)
    ids = fx.forget.take([0]).ids
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fx.model(input_ids=ids).logits)
    # Same text, same ids: the tokenizer round-trips through JSON.
    text = fx.examples["forget"][0].completion or ""
    assert tok.encode(text).ids == fx.tokenizer.encode(text).ids


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"auto_map": {"AutoModelForCausalLM": "evil.Model"}}, "remote code"),
        ({"trust_remote_code": True}, "trust_remote_code"),
        ({"model_type": "evil_lm"}, "model_type 'evil_lm' is not supported"),
        ({"architectures": ["EvilForCausalLM"]}, "architectures must be"),
        ({"num_hidden_layers": 10**6}, "num_hidden_layers"),
        ({"num_attention_heads": 0}, "num_attention_heads must be an integer"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
        ({"hidden_size": 97}, "not divisible by the 4 attention heads"),
        ({"max_position_embeddings": -1}, "max_position_embeddings"),
        ({"hidden_act": "evil"}, "cannot be built"),
        ({"rope_parameters": 5}, "rejected by transformers"),
        ({"tie_word_embeddings": "yes"}, "rejected by transformers"),
    ],
)
def test_bad_configs_are_refused(fx: Fixture, change: dict, message: str) -> None:
    """Always a ValueError (a 422 at the API), whatever transformers would raise."""
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        build_causal_lm(build_config({**fx.config, **change}))


def test_key_mismatch_names_the_keys(fx: Fixture, saved: tuple[bytes, bytes]) -> None:
    header = dict(read_header(saved[0]))
    header.pop("model.layers.0.mlp.up_proj.weight")
    header["model.layers.0.extra.weight"] = ((3,), "F32")
    shape, dtype = header["model.norm.weight"]
    header["model.norm.weight"] = ((shape[0] + 1,), dtype)
    header["model.layers.1.input_layernorm.weight"] = (shape, "I64")
    with pytest.raises(ValueError) as err:
        require_match(fx.config, header)
    text = str(err.value)
    assert "missing keys: model.layers.0.mlp.up_proj.weight" in text
    assert "unexpected keys: model.layers.0.extra.weight" in text
    assert "model.norm.weight (expected [96] F32, got [97] F32)" in text
    assert "model.layers.1.input_layernorm.weight" in text
    # Neither name of the tied embedding present: the canonical one is reported missing.
    header = dict(read_header(saved[0]))
    header.pop("model.embed_tokens.weight")
    assert check_causal_lm(fx.config, header).missing == ["model.embed_tokens.weight"]
    # Both present (an untied export of a tied model) is fine as long as shapes agree.
    header = dict(read_header(saved[0]))
    header["lm_head.weight"] = header["model.embed_tokens.weight"]
    assert check_causal_lm(fx.config, header).ok


def test_tokenizer_files_are_checked(fx: Fixture) -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tokenizer(b"\x80\x03pickle")
    with pytest.raises(ValueError, match="not a valid tokenizer"):
        load_tokenizer(b'{"model": {"type": "Nope"}}')
    with pytest.raises(ValueError, match="remote code"):
        validate_tokenizer_config({"auto_map": {"AutoTokenizer": ["x.Tok", None]}})
    with pytest.raises(ValueError, match="vocab_size is 16"):
        check_tokenizer({**fx.config, "vocab_size": 16}, fx.tokenizer)


def test_per_sample_gradients_match_a_loop(fx: Fixture) -> None:
    batch = fx.forget.take(range(5))
    for params in (None, ["model.layers.1.self_attn", "model.norm"]):
        theta = lm_theta(fx.model, params)
        fast = per_sample_grads(fx.model, batch, theta)
        slow = per_sample_grads_loop(fx.model, batch, theta)
        assert fast.shape == (5, sum(p.numel() for _, p in theta))
        assert slow.abs().max() > 0
        assert torch.allclose(fast, slow, atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in fx.model.parameters())


def test_streaming_influence_equals_cached_and_is_bounded(fx: Fixture) -> None:
    cached = lm_influence(fx.model, fx.forget)
    assert not cached.streamed and cached.scores.shape == (len(fx.forget),)
    one = cached.theta_numel * 4
    streamed = lm_influence(fx.model, fx.forget, chunk_bytes=3 * one, cache_bytes=0)
    assert streamed.streamed and streamed.chunk == 3
    assert torch.allclose(cached.scores, streamed.scores, rtol=1e-6, atol=1e-12)
    assert (cached.scores < 0).all()  # every memorised record pulls the same way
    with pytest.raises(ValueError, match="exceeds the chunk bound"):
        lm_influence(fx.model, fx.forget, chunk_bytes=one - 1)


def test_losses_are_mean_completion_nll(fx: Fixture) -> None:
    batch = fx.forget.take([0, 1])
    nll, count = record_losses(fx.model, batch)
    prompt_tokens = int(batch.prefix_len[0])
    assert int(count[0]) == int((batch.ids[0] != 0).sum()) - prompt_tokens
    one = fx.forget.take([0])
    assert torch.allclose(nll[0], record_losses(fx.model, one)[0][0], atol=1e-6)


def test_controller_runs_on_the_lm_and_guards_the_retained_records(fx: Fixture) -> None:
    model = copy.deepcopy(fx.model)
    result = unlearn_lm(model, fx.forget, fx.heldout, fx.retain, LMUnlearnConfig())
    cal = result.stats["calibration"]
    assert cal["reason"] in {"target-reached", "guard-exhausted", "budget-exhausted"}
    assert cal["steps"] >= 1 and cal["trajectory"][0]["forget_recall"] == 1.0
    assert result.stats["selection"]["kept"] == len(fx.forget)
    assert result.stats["peak_rss_mib"] > 0
    final = evaluate_lm(model, fx.forget, fx.heldout, fx.retain)
    # The guard's promise: what is returned kept the retained records' recall and perplexity.
    assert final["member_probe"]["exact_recall"] >= 1.0 - 0.03
    start_ppl = cal["start"]["heldout_ppl"]
    assert final["heldout"]["perplexity"] <= start_ppl * 1.1 + 1e-6
    assert final["forget"]["nll"] > cal["start"]["forget_nll"]  # it did move away


def test_without_guards_ascent_forgets_and_destroys(fx: Fixture) -> None:
    """The negative result of LANGUAGE_MODELS.md, measured here: retain-free ascent that is
    allowed to reach zero forget recall takes the retained records' recall with it."""
    model = copy.deepcopy(fx.model)
    cfg = LMUnlearnConfig(ppl_max_rise=100.0, guard_max_drop=1.0)
    unlearn_lm(model, fx.forget, fx.heldout, fx.retain, cfg)
    final = evaluate_lm(model, fx.forget, fx.heldout, fx.retain)
    assert final["forget"]["exact_recall"] == 0.0
    assert final["member_probe"]["exact_recall"] < 0.5


def test_text_checks_interface(fx: Fixture) -> None:
    checks = TextChecks(fx.model, fx.forget, fx.heldout, fx.retain)
    m = checks.measure()
    assert checks.has_target and not checks.target_met(m)
    assert m.forget_recall == 1.0 and m.probe_recall == 1.0 and m.auc == 1.0
    assert m.auc_limit is not None and 0.5 < m.auc_limit < 1.0
    worse = copy.copy(m)
    worse.probe_recall = 0.9
    assert checks.guard_failed(m, worse, 0.03) and not checks.guard_failed(m, m, 0.03)
    gone = copy.copy(m)
    gone.forget_recall, gone.forget_nll = 0.0, (m.heldout_nll or 0.0) + 0.1
    assert checks.target_met(gone)
    assert not TextChecks(fx.model, fx.forget, None).has_target


def test_lora_theta_is_merged_back_into_the_registered_layout(fx: Fixture) -> None:
    model = copy.deepcopy(fx.model)
    keys = list(model.state_dict())
    result = unlearn_lm(model, fx.forget, fx.heldout, fx.retain, LMUnlearnConfig(lora_rank=4))
    assert result.stats["lora"] == {"rank": 4, "alpha": 16, "adapters": 16, "merged": True}
    assert result.stats["calibration"]["steps"] >= 1
    # A plain model again: the same keys, no adapter left, only the targeted layers moved.
    assert type(model).__name__ == "LlamaForCausalLM" and list(model.state_dict()) == keys
    assert not any("lora" in name for name, _ in model.named_modules())
    before = fx.model.state_dict()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(
        k.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj"} for k in changed
    )
    assert all(p.requires_grad for p in model.parameters())
    final = evaluate_lm(model, fx.forget, fx.heldout, fx.retain)
    assert final["member_probe"]["exact_recall"] >= 1.0 - 0.03  # the guard held here too


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lora_rank": 4, "params": ["model.layers.0"]}, "exclude each other"),
        ({"lora_rank": 4, "lora_targets": ["no_such_layer"]}, "lora_targets"),
        ({"lora_rank": 4, "lora_targets": []}, "lora_targets must be"),
        ({"lora_rank": -1}, "lora_rank"),
    ],
)
def test_bad_lora_settings_are_refused(fx: Fixture, kwargs: dict, message: str) -> None:
    """Refused when the config is built (a request's params: 422 at submission), or, for
    targets no layer has, before anything is changed."""
    model = copy.deepcopy(fx.model)
    with pytest.raises(ValueError, match=message):
        unlearn_lm(model, fx.forget, fx.heldout, fx.retain, LMUnlearnConfig(**kwargs))
    assert list(model.state_dict()) == list(fx.model.state_dict())  # left as it was
    assert not any("lora" in name for name, _ in model.named_modules())
