"""The fine-tuning recipe of a causal language model, given at registration (issue 22).

A causal LM is registered with the base it was fine-tuned from and how: ``base_version`` names
a registered ``causal_lm`` model version (the base registered first, as any LM is: its
weights, config.json and tokenizer files), and the recipe's settings say how version 1 was
fine-tuned from it on which text train datasets (worker.imu.lm_recipe). Registration checks
everything that can be checked without training: the base exists, is a causal LM whose
checkpoint is still stored, uses the same tokenizer.json, and its weights fit this model's
config.json; the LoRA targets name linear layers of the model; max_length fits its positions.
The stored recipe pins the base by its checkpoint's sha256, so the recipe's hash (what
receipts cite) identifies the base weights too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, NoReturn

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from service import engine
from service.domain.datasets import resolve_dataset
from service.domain.lm_registration import is_lm
from service.errors import validation
from service.storage.objects import Storage
from service.storage.tables import Model, ModelVersion

if TYPE_CHECKING:
    from service.domain.lm_registration import LMFiles

MAX_RECIPE_TOKENS = 512  # worker.lm_job.MAX_TOKENS


class LMRecipeIn(BaseModel):
    """How version 1 of a causal LM was fine-tuned from its base, so that a request can be
    answered exactly by fine-tuning the base again without its records (worker.imu.lm_recipe).
    The trainer is AdamW on the mean token NLL of each record, mini-batches in an order drawn
    from `seed`; LoRA adapters are merged into the weights after training."""

    model_config = ConfigDict(extra="forbid", title="LMTrainingRecipe")

    base_version: str = Field(
        min_length=1,
        max_length=64,
        description="The registered causal_lm model version this model was fine-tuned from.",
    )
    method: Literal["full", "lora"] = Field(
        default="full", description="full: every weight trained; lora: low-rank adapters."
    )
    optimizer: Literal["adamw"] = "adamw"
    epochs: int = Field(ge=1, le=10_000, strict=True)
    lr: float = Field(gt=0, le=1, allow_inf_nan=False)
    batch_size: int = Field(default=8, ge=1, le=4096, strict=True)
    weight_decay: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)
    max_length: int | None = Field(
        default=None,
        ge=8,
        le=MAX_RECIPE_TOKENS,
        strict=True,
        description="Tokens kept per record (default: the model's, at most 512).",
    )
    max_grad_norm: float | None = Field(default=None, gt=0, le=1e6, allow_inf_nan=False)
    seed: int = Field(default=0, ge=0, le=(1 << 63) - 1, strict=True)
    loss_tokens: Literal["completion", "all"] = Field(
        default="completion",
        description="completion: loss on the completion of prompt/completion records; all: on "
        "every token (plain-text records are always trained on every token).",
    )
    lora_r: int | None = Field(default=None, ge=1, le=1024, strict=True)
    lora_alpha: int | None = Field(default=None, ge=1, le=1 << 16, strict=True)
    lora_dropout: float | None = Field(default=None, ge=0, lt=1, allow_inf_nan=False)
    lora_targets: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="Linear layers adapted (suffixes of module names); default the attention "
        "projections q_proj, k_proj, v_proj, o_proj.",
    )
    datasets: list[str] = Field(
        min_length=1,
        max_length=16,
        description="The text train datasets (ids or unique names) version 1 was fine-tuned "
        "on, in order.",
    )


_LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")


def _refuse(field: str, message: str) -> NoReturn:
    raise validation(f"{field}: {message}", [{"field": field, "message": message}])


def _check_lora(recipe: LMRecipeIn, config: bytes) -> None:
    given = [f for f in _LORA_FIELDS if getattr(recipe, f) is not None]
    if recipe.method != "lora":
        for f in given:
            _refuse(f"spec.recipe.{f}", "only with method lora")
        return
    linear = engine.linear_layer_names(config)
    for i, target in enumerate(recipe.lora_targets or engine.default_lora_targets()):
        if not any(name == target or name.endswith("." + target) for name in linear):
            field = f"spec.recipe.lora_targets.{i}" if recipe.lora_targets else "spec.recipe"
            _refuse(field, f"no linear layer of the model is named {target!r}")


def _check_base(session: Session, storage: Storage, ref: str, files: LMFiles) -> ModelVersion:
    field = "spec.recipe.base_version"
    base = session.get(ModelVersion, ref)
    if base is None:
        _refuse(field, f"no model version {ref!r}; register the base model first")
    model = session.get(Model, base.model_id)
    assert model is not None
    if not is_lm(model.architecture):
        _refuse(field, f"version {ref} is a {model.architecture!r} model, not a causal_lm")
    if base.storage_key is None:
        _refuse(field, f"version {ref} was retired: its checkpoint is gone")
    digests = (model.arch_kwargs or {}).get("files") or {}
    ours = files.digests()["tokenizer.json"]["sha256"]
    if (digests.get("tokenizer.json") or {}).get("sha256") != ours:
        _refuse(field, f"the base ({model.name!r}) has another tokenizer.json than this model")
    try:
        with storage.open_read(str(base.storage_key)) as fh:
            header = engine.read_header(fh)
        result = engine.check_causal_lm(files.config, header)
    except (OSError, ValueError) as exc:
        _refuse(field, f"the base checkpoint cannot be read: {exc}")
    if not result.ok:
        _refuse(field, f"the base's weights do not fit this config.json: {result.describe()}")
    return base


def _check_length(recipe: LMRecipeIn, config: bytes) -> None:
    import json

    positions = json.loads(config).get("max_position_embeddings")
    length = recipe.max_length
    if length is not None and isinstance(positions, int) and length > positions:
        _refuse("spec.recipe.max_length", f"exceeds max_position_embeddings {positions}")


def resolve_lm_recipe(
    session: Session, storage: Storage, recipe: LMRecipeIn, files: LMFiles
) -> dict[str, Any]:
    """The recipe as stored (worker.imu.lm_recipe.LMRecipe as JSON): the base pinned by its
    sha256, the LoRA defaults filled in, the datasets resolved to ids (text train sets)."""
    _check_lora(recipe, files.config)
    _check_length(recipe, files.config)
    base = _check_base(session, storage, recipe.base_version, files)
    ids = []
    for i, ref in enumerate(recipe.datasets):
        field = f"spec.recipe.datasets.{i}"
        ds = resolve_dataset(session, ref, field)
        if ds.role != "train" or ds.kind != "text":
            _refuse(
                field,
                f"{ds.id!r} is a {ds.kind} {ds.role} dataset; a causal_lm recipe "
                "fine-tunes on text datasets with role train",
            )
        ids.append(ds.id)
    values = recipe.model_dump(exclude_none=True)
    values.update(base_version=base.id, base_sha256=base.sha256, datasets=ids)
    return engine.stored_lm_recipe(values)


__all__ = ["LMRecipeIn", "resolve_lm_recipe"]
