"""Architecture ``causal_lm``: a Hugging Face causal LM given as ``config.json``,
``model.safetensors`` and ``tokenizer.json`` (+ ``tokenizer_config.json``).

What the service runs before accepting a registration, with no code from the upload ever
executed: the config is plain JSON whose ``model_type`` is on an allowlist of classes that ship
with transformers (never ``auto_map`` / ``trust_remote_code``), the model is built on the
``meta`` device and its state dict compared with the safetensors header (``read_header``:
bounded, no unpickling) exactly as ``check_state_dict`` does for classifiers, and the tokenizer
is loaded from JSON by the ``tokenizers`` library (no pickles, no Python code).

transformers is an optional extra (``lm``); it is imported lazily so the classifier path and
the service start without it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from worker.imu.architectures import StateDictCheck, compare_state_dict

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PretrainedConfig

ARCHITECTURE = "causal_lm"
# model_type -> the one causal-LM class transformers ships for it.
ALLOWED_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
}
# Keys that would make transformers fetch or run code from outside the library.
FORBIDDEN_CONFIG_KEYS = ("auto_map", "trust_remote_code", "custom_pipelines")
MAX_CONFIG_BYTES = 1 << 20
MAX_TOKENIZER_BYTES = 64 << 20
MAX_TOKENIZER_CONFIG_BYTES = 1 << 20
# Bounds on what drives module count and meta-tensor sizes: a config asking for a million
# layers would take minutes to build even on the meta device.
MAX_LAYERS = 256
MAX_VOCAB = 1 << 20
MAX_WIDTH = 1 << 16
MAX_PARAMETERS = 20_000_000_000
MAX_HEADS = 4096
MAX_POSITIONS = 1 << 24
_LAYER_KEYS = ("num_hidden_layers", "n_layer")
_WIDTH_KEYS = ("hidden_size", "n_embd", "intermediate_size", "n_inner", "head_dim")
_HEAD_KEYS = ("num_attention_heads", "num_key_value_heads", "n_head")
_POSITION_KEYS = ("max_position_embeddings", "n_positions")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the lm extra is part of make install
        raise ValueError(
            "causal_lm needs the 'lm' extra (pip install 'lethe-unlearning[lm]')"
        ) from exc
    return transformers


def parse_json_object(data: bytes | str | Mapping[str, Any], what: str, limit: int) -> dict:
    """A JSON object from bytes (bounded), a string or an already parsed mapping."""
    if isinstance(data, Mapping):
        return dict(data)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if len(raw) > limit:
        raise ValueError(f"{what}: {len(raw)} bytes exceeds the limit of {limit}")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{what}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{what}: expected a JSON object")
    return doc


def _int_field(cfg: Mapping[str, Any], key: str, hi: int) -> None:
    value = cfg.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
        raise ValueError(f"config.json: {key} must be an integer in [1, {hi}], got {value!r}")


def validate_config(config: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    """The config as a dict, after the checks that need no transformers import."""
    cfg = parse_json_object(config, "config.json", MAX_CONFIG_BYTES)
    bad = [k for k in FORBIDDEN_CONFIG_KEYS if k in cfg]
    if bad:
        raise ValueError(f"config.json: remote code is never run; remove {', '.join(bad)}")
    model_type = cfg.get("model_type")
    if model_type not in ALLOWED_MODEL_TYPES:
        raise ValueError(
            f"config.json: model_type {model_type!r} is not supported; "
            f"allowed: {', '.join(sorted(ALLOWED_MODEL_TYPES))}"
        )
    archs = cfg.get("architectures")
    expected = ALLOWED_MODEL_TYPES[model_type]
    if archs is not None and (
        not isinstance(archs, list) or any(a != expected for a in archs) or not archs
    ):
        raise ValueError(f"config.json: architectures must be [{expected!r}], got {archs!r}")
    for key in _LAYER_KEYS:
        _int_field(cfg, key, MAX_LAYERS)
    for key in _WIDTH_KEYS:
        _int_field(cfg, key, MAX_WIDTH)
    for key in _HEAD_KEYS:
        _int_field(cfg, key, MAX_HEADS)
    for key in _POSITION_KEYS:
        _int_field(cfg, key, MAX_POSITIONS)
    _int_field(cfg, "vocab_size", MAX_VOCAB)
    _check_heads(cfg)
    return cfg


def _check_heads(cfg: Mapping[str, Any]) -> None:
    """The divisibility the attention layers assume (they would fail only at the first
    forward pass, after the registration was accepted)."""
    width = cfg.get("hidden_size", cfg.get("n_embd"))
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    kv = cfg.get("num_key_value_heads")
    explicit = "head_dim" in cfg
    if isinstance(width, int) and isinstance(heads, int) and not explicit and width % heads:
        raise ValueError(
            f"config.json: the width {width} is not divisible by the {heads} attention heads"
        )
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise ValueError(
            f"config.json: num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {kv}"
        )


def build_config(config: bytes | str | Mapping[str, Any]) -> PretrainedConfig:
    """A transformers config object of the allowed class (``for_model`` never runs code)."""
    cfg = validate_config(config)
    rest = {k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")}
    try:
        out = _transformers().AutoConfig.for_model(cfg["model_type"], **rest)
    except Exception as exc:  # untrusted values: transformers raises many kinds of errors
        raise ValueError(f"config.json: rejected by transformers ({_short(exc)})") from None
    # Eager attention: the per-sample gradients vmap over the model, and it is the one
    # implementation every allowed class has.
    out._attn_implementation = "eager"
    return out


def build_causal_lm(config: bytes | str | Mapping[str, Any] | PretrainedConfig) -> nn.Module:
    """The model with freshly initialised weights on the current default device; under
    ``torch.device("meta")`` shapes and dtypes only. Embeddings are tied when the config says so."""
    tf = _transformers()
    cfg = config if isinstance(config, tf.PretrainedConfig) else build_config(cast(Any, config))
    try:
        model = tf.AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except Exception as exc:  # e.g. an unknown activation or rope type: KeyError
        raise ValueError(f"config.json: the model cannot be built ({_short(exc)})") from None
    return model


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one Parameter (tied embeddings): a checkpoint needs one of each group."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def check_causal_lm(
    config: bytes | str | Mapping[str, Any], tensors_meta: Mapping[str, Any]
) -> StateDictCheck:
    """Compare a checkpoint's header (key -> (shape, dtype) or tensors) with the model built
    from ``config`` on the meta device; the same rule as ``check_state_dict`` (shape, and dtype
    kind: floating vs integer). A tied weight may be present under any of its names."""
    with torch.device("meta"):
        model = build_causal_lm(config)
    numel = sum(p.numel() for p in model.parameters())
    if numel > MAX_PARAMETERS:
        raise ValueError(f"config.json: {numel} parameters exceeds {MAX_PARAMETERS}")
    got = set(tensors_meta)
    optional: set[str] = set()
    for group in tied_groups(model):
        # One name of a tied group carries the tensor (save_pretrained drops the others);
        # with none present the first, canonical name is reported missing.
        present = [k for k in group if k in got]
        optional.update(k for k in group if k not in present)
        if not present:
            optional.discard(group[0])
    return compare_state_dict(model, tensors_meta, frozenset(optional))


def require_match(config: bytes | str | Mapping[str, Any], tensors_meta: Mapping[str, Any]) -> None:
    """``check_causal_lm`` as a ValueError naming the missing, unexpected, mis-shaped keys."""
    result = check_causal_lm(config, tensors_meta)
    if not result.ok:
        raise ValueError(f"the weights do not match config.json: {result.describe()}")


def load_causal_lm(
    config: bytes | str | Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
) -> nn.Module:
    """Build the model and load a checked state dict (tied weights filled through the tie)."""
    require_match(config, state_dict)
    model = build_causal_lm(config)
    missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
    tied = {k for group in tied_groups(model) for k in group}
    if unexpected or set(missing) - tied:  # require_match ruled these out; keep it honest
        raise ValueError(f"load failed: missing {missing}, unexpected {unexpected}")
    model.eval()
    return model


def load_tokenizer(data: bytes | str) -> Tokenizer:
    """A ``tokenizers`` tokenizer from tokenizer.json (JSON only: nothing is unpickled)."""
    from tokenizers import Tokenizer

    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if len(raw) > MAX_TOKENIZER_BYTES:
        raise ValueError(f"tokenizer.json: {len(raw)} bytes exceeds {MAX_TOKENIZER_BYTES}")
    parse_json_object(raw, "tokenizer.json", MAX_TOKENIZER_BYTES)
    try:
        return Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # the Rust side raises its own exception type
        raise ValueError(f"tokenizer.json: not a valid tokenizer ({exc})") from None


def validate_tokenizer_config(data: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json as a dict; refuses custom tokenizer classes (remote code)."""
    cfg = parse_json_object(data, "tokenizer_config.json", MAX_TOKENIZER_CONFIG_BYTES)
    bad = [k for k in FORBIDDEN_CONFIG_KEYS if k in cfg]
    if bad:
        raise ValueError(f"tokenizer_config.json: remote code is never run; remove {bad}")
    return cfg


def check_tokenizer(config: bytes | str | Mapping[str, Any], tokenizer: Tokenizer) -> None:
    """Every token id the tokenizer can produce must index the model's embedding."""
    cfg = validate_config(config)
    vocab = cfg.get("vocab_size")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if isinstance(vocab, int) and size > vocab:
        raise ValueError(f"tokenizer.json has {size} tokens but config.json vocab_size is {vocab}")
