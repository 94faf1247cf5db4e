"""The service's one door to the engine (`worker.imu`): everything `service/` needs from it.

No other module of `service/` imports `worker.imu` (an import-linter contract in
pyproject.toml checks it; the only other import of `worker` is `service.cli.workers`, which
starts the worker processes). Keeping the door narrow says what the API relies on: the
parameter configs it validates requests against, the architecture and checkpoint checks of a
registration, the causal-LM file checks, recipe identities and the device grammar; plus the
training helpers the demo and the walkthrough's sample data use.

Only the torch-free `worker.imu.devices` and `worker.imu.canonical` are imported at module
level: everything else is
imported on first call, so that creating the app does not load torch.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from worker.imu.canonical import canonical_json
from worker.imu.devices import DEVICE_NAMES, DEVICE_RE

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import ModuleType

    import torch

    from worker.imu.architectures import StateDictCheck
    from worker.imu.settings import Spec

__all__ = [
    "DEVICE_NAMES",
    "DEVICE_RE",
    "architectures",
    "check_causal_lm",
    "check_state_dict",
    "build_model",
    "canonical_json",
    "default_lora_targets",
    "fit",
    "language_models",
    "linear_layer_names",
    "lm_config_for",
    "load_safetensors_into",
    "param_configs",
    "param_fields",
    "per_class_accuracy",
    "read_header",
    "recipe_sha256",
    "save_safetensors",
    "stored_lm_recipe",
]


def param_configs() -> dict[str, type]:
    """The engine's config dataclasses the request `params` models derive from:
    ``{"imu": IMUConfig, "ga": GAConfig, "lm": LMUnlearnConfig}``."""
    from worker.imu.config import GAConfig, IMUConfig
    from worker.imu.lm_unlearn import LMUnlearnConfig

    return {"imu": IMUConfig, "ga": GAConfig, "lm": LMUnlearnConfig}


def param_fields(config: type) -> list[tuple[str, Any, Spec]]:
    """Each field of an engine config with its default and its `Spec` (description, kind,
    bounds, choices): what the request models, the OpenAPI document and the CLI help say."""
    from worker.imu.settings import specs

    out = []
    for f, spec in specs(config):
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None if f.default is dataclasses.MISSING else f.default
        out.append((f.name, default, spec))
    return out


def lm_config_for(method: str, overrides: Mapping[str, Any]) -> Any:
    """The language-model config of a method with `overrides` (ValueError/TypeError if bad)."""
    from worker.imu.lm_unlearn import config_for

    return config_for(method, dict(overrides))


def read_header(fh: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """The safetensors header (tensor names, shapes, dtypes); ValueError for a non-safetensors
    file, pickles included."""
    from worker.imu.checkpoints import read_header as read

    return read(fh)


def architectures() -> list[str]:
    """The registered architecture names (causal_lm is the service's, not listed here)."""
    from worker.imu.architectures import available

    return list(available())


def check_state_dict(
    architecture: str, arch_kwargs: Mapping[str, Any] | None, header: Mapping[str, Any]
) -> StateDictCheck:
    """Do the checkpoint's tensors fit the architecture? KeyError: unknown architecture;
    ValueError: bad kwargs."""
    from worker.imu.architectures import check_state_dict as check

    return check(architecture, arch_kwargs, header)


def language_models() -> ModuleType:
    """`worker.imu.language_models`: the size limits and checks of config.json, tokenizer.json
    and tokenizer_config.json (it imports transformers, so only when a causal LM is seen)."""
    from worker.imu import language_models as lm

    return lm


def check_causal_lm(config: bytes, header: Mapping[str, Any]) -> StateDictCheck:
    from worker.imu.language_models import check_causal_lm as check

    return check(config, header)


def default_lora_targets() -> tuple[str, ...]:
    from worker.imu.lm_lora import DEFAULT_TARGETS

    return tuple(DEFAULT_TARGETS)


def linear_layer_names(config: bytes) -> list[str]:
    """The names of the nn.Linear modules of the causal LM a config.json describes (built on
    the meta device: no memory for weights)."""
    import torch
    from torch import nn

    from worker.imu.language_models import build_causal_lm

    with torch.device("meta"):
        model = build_causal_lm(config)
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def stored_lm_recipe(values: dict[str, Any]) -> dict[str, Any]:
    """A causal-LM recipe as stored: validated and defaults filled in (ValueError if bad)."""
    from worker.imu.lm_recipe import LMRecipe

    return LMRecipe.from_dict(values).to_dict()


def recipe_sha256(recipe: dict[str, Any]) -> str:
    """The identity receipts cite for a stored recipe (either kind)."""
    from worker.imu.lm_recipe import LMRecipe, is_lm_recipe
    from worker.imu.recipe import Recipe

    if is_lm_recipe(recipe):
        return LMRecipe.from_dict(recipe).sha256()
    return Recipe.from_dict(recipe).sha256()


# Training helpers for `lethe demo` and the walkthrough's sample data (never the API).
def build_model(architecture: str, **kwargs: Any) -> torch.nn.Module:
    from worker.imu.architectures import build

    return build(architecture, **kwargs)


def fit(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    from worker.imu.train import fit as train

    return train(model, *args, **kwargs)


def save_safetensors(model: torch.nn.Module, path: Any) -> Any:
    from worker.imu.checkpoints import save_safetensors as save

    return save(model, path)


def load_safetensors_into(model: torch.nn.Module, path: Any) -> Any:
    from worker.imu.checkpoints import load_safetensors_into as load

    return load(model, path)


def per_class_accuracy(model: torch.nn.Module, *args: Any) -> list[float | None]:
    from worker.imu.train import predict_per_class_accuracy

    return predict_per_class_accuracy(model, *args)
