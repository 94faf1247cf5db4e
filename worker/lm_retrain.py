"""Exact forgetting for a causal LM: re-fine-tune the recipe's base on the retained records.

- at loading (``exact_route``): whether the model's recipe can answer this request — an LM
  recipe (worker.imu.lm_recipe), the request's dataset among its datasets, the base version's
  checkpoint still stored (a base whose own line forgot records has its old checkpoints
  retired: re-fine-tuning from one would bring those records back, so it is never done) —
  and a loader of what the re-fine-tune needs, read only when it runs;
- at retraining (``run_lm_retrain``): the base checkpoint (sha256 checked against the recipe),
  the retained texts of the recipe's datasets tokenised as the job's, ``finetune`` by the
  recipe with progress after every optimizer step (each report is where a cancel, a lost
  lease or a shutdown stops the run). ``loaded.model`` becomes the re-fine-tuned model; saving
  writes it in version 1's layout, as every LM version.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.domain.states import Phase
from service.storage.db import transaction
from service.storage.tables import ModelVersion
from worker.errors import JobError, checkpoint_corrupt

if TYPE_CHECKING:
    from worker.imu.lm_data import TokenBatch
    from worker.imu.lm_recipe import LMRecipe
    from worker.lm_job import TokenizerSettings
    from worker.loading import JobInputs, Loaded, Loader


@dataclass
class RetrainInputs:
    recipe: LMRecipe
    config: dict[str, Any]  # the model's config.json (the base fits it: registration)
    base_state: dict[str, Any]  # the base checkpoint's tensors
    train: TokenBatch  # the retained records of the recipe's datasets


def _base_key(loader: Loader, version_id: str) -> str | None:
    with transaction(loader.ctx.session_factory) as session:
        version = session.get(ModelVersion, version_id)
        return version.storage_key if version is not None else None


def exact_route(
    loader: Loader,
    inputs: JobInputs,
    config: dict[str, Any],
    tokenizer: Any,
    settings: TokenizerSettings,
) -> dict[str, Any]:
    """``Loaded``'s recipe fields: the recipe and a loader of the re-fine-tune's inputs, or
    why the recipe cannot answer the request (``exact_route``); {} without a recipe."""
    from worker.imu.lm_recipe import LMRecipe, is_lm_recipe
    from worker.lm_job import TokenizerSettings

    if not inputs.recipe:
        return {}
    if not is_lm_recipe(inputs.recipe):
        return {"exact_route": "the model's recipe is not a causal_lm fine-tuning recipe"}
    recipe = LMRecipe.from_dict(inputs.recipe)
    if inputs.dataset.dataset_id not in {s.dataset_id for s, _ in inputs.recipe_sources}:
        return {"exact_route": "the request's dataset is not among the recipe's datasets"}
    key = _base_key(loader, recipe.base_version)
    if key is None:
        return {
            "exact_route": f"the recipe's base version {recipe.base_version} is retired "
            "or gone: re-fine-tuning from it is not possible"
        }
    forget = set(inputs.keys)
    length = recipe.max_length or settings.max_length
    train_settings = TokenizerSettings(settings.bos_id, settings.pad_id, length)

    def retained() -> RetrainInputs:
        from safetensors.torch import load as st_load

        from worker.lm_job import _batch

        data = loader.read_object(key, f"checkpoint of the base version {recipe.base_version}")
        if hashlib.sha256(data).hexdigest() != recipe.base_sha256:
            raise checkpoint_corrupt(
                "Base checkpoint corrupt",
                f"the base version {recipe.base_version} does not have the sha256 its recipe "
                "pinned",
            )
        parts = []
        for source, keys in inputs.recipe_sources:
            if source.dataset_id == inputs.dataset.dataset_id:
                keys = tuple(k for k in keys if k not in forget)
            if keys:
                parts.append(_batch(loader, source, list(keys), tokenizer, train_settings))
        if not parts:
            raise JobError(
                "nothing-to-train-on",
                "Nothing to train on",
                "the request names every record the recipe fine-tunes on: no model can be "
                "fine-tuned without them",
            )
        return RetrainInputs(recipe, config, st_load(data), _concat(parts))

    return {"recipe": inputs.recipe, "retained": retained}


def _concat(parts: list[TokenBatch]) -> TokenBatch:
    import torch
    import torch.nn.functional as F

    from worker.imu.lm_data import TokenBatch

    if len(parts) == 1:
        return parts[0]
    width = max(int(p.ids.shape[1]) for p in parts)
    pad = parts[0].pad_id
    ids = torch.cat([F.pad(p.ids, (0, width - p.ids.shape[1]), value=pad) for p in parts])
    scored = torch.cat([F.pad(p.scored, (0, width - p.scored.shape[1])) for p in parts])
    return TokenBatch(
        [k for p in parts for k in p.keys],
        [t for p in parts for t in p.texts],
        ids,
        scored,
        torch.cat([p.prefix_len for p in parts]),
        pad,
    )


def run_lm_retrain(
    loaded: Loaded, progress: Callable[[str, float], None], device: str
) -> dict[str, Any]:
    """Re-fine-tune the base by the recipe on the retained records; the stats (JSON)."""
    from worker.imu.language_models import load_causal_lm
    from worker.imu.lm_recipe import finetune
    from worker.job_metrics import jsonable

    assert loaded.retained is not None
    progress(Phase.RETRAINING, 0.0)
    t0 = time.perf_counter()
    inputs: RetrainInputs = loaded.retained()
    try:
        model = load_causal_lm(inputs.config, inputs.base_state)
    except (ValueError, RuntimeError) as exc:
        raise checkpoint_corrupt(
            "Base checkpoint unusable",
            f"the base version cannot be loaded into this model's config.json: {exc}",
        ) from None
    del inputs.base_state
    model.to(device)
    load_s = time.perf_counter() - t0
    try:
        stats = finetune(
            model,
            inputs.train,
            inputs.recipe,
            on_step=lambda done: progress(Phase.RETRAINING, done),
        )
    except ValueError as exc:  # diverged, or LoRA targets that match nothing
        raise JobError("retrain-failed", "Re-fine-tune failed", str(exc)) from None
    stats["seconds"] = {"load": load_s, "retrain": time.perf_counter() - t0 - load_s}
    stats["n_forget"] = len(loaded.keys)
    loaded.model = model
    return dict(jsonable(stats))


__all__ = ["RetrainInputs", "exact_route", "run_lm_retrain"]
