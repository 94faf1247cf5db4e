"""A job on a causal language model (architecture ``causal_lm``): the LM side of the
loading, unlearning, evaluating and saving phases (worker/execution.py calls these when the
model is an LM; the phases, fencing and exactly-once saving are shared with classifiers).

- loading: config.json, tokenizer.json and tokenizer_config.json from the model's stored
  files (their sha256 checked against the registration), the version's safetensors loaded
  into the model transformers builds from the config (no remote code), the JSONL records of
  the forget set, the eval set's two halves and the member probe tokenised;
- unlearning: ``worker.imu.lm_unlearn.unlearn_lm`` (IMU or GA, the one calibrated
  controller with ``TextChecks`` guarding the eval guard half and the member probe); exact
  forgetting (re-fine-tuning the recipe's base) is worker/lm_retrain.py;
- evaluating: ``text_metrics.evaluate_lm`` on the forget set, the eval *policy* half and the
  member probe, plus the AUC limit, time and peak RSS;
- saving: the state dict with each tied weight once (as ``save_pretrained`` writes it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from service.domain.lm_registration import FILE_NAMES, file_key
from service.domain.states import Phase
from worker.errors import JobError, checkpoint_corrupt, unsupported_dataset

if TYPE_CHECKING:
    from service.ingest.text_datasets import TextCorpus
    from worker.imu.lm_data import TokenBatch
    from worker.loading import DataSource, JobInputs, Loaded, Loader

MAX_TOKENS = 512


@dataclass(frozen=True)
class TokenizerSettings:
    bos_id: int | None
    pad_id: int
    max_length: int

    @classmethod
    def of(cls, config: dict[str, Any], tokenizer_config: dict[str, Any]) -> TokenizerSettings:
        """BOS only when tokenizer_config.json asks for it (``add_bos_token``); padding never
        reaches a real token's logits (lm_data: right padding under causal attention)."""
        bos = config.get("bos_token_id")
        add_bos = tokenizer_config.get("add_bos_token") is True and isinstance(bos, int)
        pad: int = 0
        for key in ("pad_token_id", "eos_token_id"):
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                pad = value
                break
        positions = config.get("max_position_embeddings") or config.get("n_positions")
        length = min(MAX_TOKENS, positions) if isinstance(positions, int) else MAX_TOKENS
        return cls(bos if add_bos else None, pad, int(length))


# Loading ------------------------------------------------------------------------------------
def _model_files(loader: Loader, inputs: JobInputs, model_id: str) -> dict[str, bytes]:
    digests = (inputs.arch_kwargs or {}).get("files") or {}
    out: dict[str, bytes] = {}
    for name in FILE_NAMES:
        data = loader.read_object(file_key(model_id, name), f"model file {name}")
        want = (digests.get(name) or {}).get("sha256")
        if hashlib.sha256(data).hexdigest() != want:
            raise checkpoint_corrupt(
                "Model file corrupt",
                f"the stored {name} does not have the sha256 recorded at registration",
            )
        out[name] = data
    return out


def text_corpus(loader: Loader, source: DataSource) -> TextCorpus:
    """The dataset's current JSONL file, parsed (a purge may have replaced it)."""
    from service.ingest.datasets_io import DatasetError
    from service.ingest.text_datasets import load_text_corpus

    source, raw = loader.read_dataset(source)
    assert isinstance(raw, bytes)
    try:
        return load_text_corpus(raw)
    except DatasetError as exc:
        raise JobError("dataset-invalid", "Dataset unreadable", f"{source.name}: {exc}") from None


def _batch(
    loader: Loader,
    source: DataSource,
    keys: list[str] | None,
    tokenizer: Any,
    settings: TokenizerSettings,
) -> TokenBatch:
    from worker.imu.lm_data import TextExample, tokenize

    if source.kind != "text":
        raise unsupported_dataset(
            source.name, source.kind, "a causal_lm needs text (JSONL) datasets"
        )
    corpus = text_corpus(loader, source)
    try:
        records = corpus.select(keys if keys is not None else corpus.ids)
    except KeyError as exc:
        raise JobError(
            "records-unavailable", "Records unavailable", f"{source.name}: {exc.args[0]}"
        ) from None
    examples = [
        TextExample(r.id, text=r.text, prompt=r.prompt, completion=r.completion) for r in records
    ]
    try:
        return tokenize(
            examples,
            tokenizer,
            max_length=settings.max_length,
            bos_id=settings.bos_id,
            pad_id=settings.pad_id,
        )
    except ValueError as exc:
        raise JobError("dataset-invalid", "Records unusable", f"{source.name}: {exc}") from None


def load_lm(loader: Loader, inputs: JobInputs, model_id: str, device: str) -> Loaded:
    from safetensors.torch import load as st_load

    from worker.heldout import split_eval_keys
    from worker.imu.architectures import SAFETENSORS_DTYPES
    from worker.imu.checkpoints import read_header
    from worker.imu.language_models import load_causal_lm, load_tokenizer
    from worker.lm_retrain import exact_route
    from worker.loading import loaded_from

    files = _model_files(loader, inputs, model_id)
    data = loader.checkpoint_bytes(inputs)
    layout = {key: SAFETENSORS_DTYPES[dtype] for key, (_, dtype) in read_header(data).items()}
    loader.progress(Phase.LOADING, 0.2)
    try:
        config = json.loads(files["config.json"])
        tokenizer_config = json.loads(files["tokenizer_config.json"])
        tokenizer = load_tokenizer(files["tokenizer.json"])
        model = load_causal_lm(config, st_load(data))
    except (ValueError, RuntimeError) as exc:
        raise checkpoint_corrupt(
            "Checkpoint corrupt",
            f"version {inputs.version_number} cannot be loaded as a causal_lm: {exc}",
        ) from None
    model.to(device)
    settings = TokenizerSettings.of(config, tokenizer_config)
    loader.progress(Phase.LOADING, 0.4)
    forget = _batch(loader, inputs.dataset, inputs.keys, tokenizer, settings)
    loader.progress(Phase.LOADING, 0.6)
    eval_batch = guard = split = None
    if inputs.eval:
        eval_keys = inputs.eval_keys
        if eval_keys is None:
            eval_keys = text_corpus(loader, inputs.eval).ids
        split = split_eval_keys(eval_keys)
        eval_batch = _batch(loader, inputs.eval, split.policy, tokenizer, settings)
        guard = _batch(loader, inputs.eval, split.guard, tokenizer, settings)
    probe = None
    if inputs.probe:
        probe = _batch(loader, inputs.probe, inputs.probe_keys, tokenizer, settings)
    loader.progress(Phase.LOADING, 0.8)
    route = exact_route(loader, inputs, config, tokenizer, settings)  # worker/lm_retrain.py
    return loaded_from(
        inputs,
        split,
        model=model,
        forget=forget,
        eval=eval_batch,
        member_probe=probe,
        guard=guard,
        class_wise=False,
        lm=True,
        layout=layout,
        **route,
    )


# Unlearning -----------------------------------------------------------------------------------
def run_lm_engine(
    loaded: Loaded, progress: Callable[[str, float], None], key_hash: Callable[[int], str]
) -> dict[str, Any]:
    from worker.imu.lm_unlearn import config_for, unlearn_lm
    from worker.job_metrics import jsonable
    from worker.unlearning import InvalidParams

    try:
        cfg = config_for(loaded.method, loaded.params)
    except (ValueError, TypeError) as exc:
        raise InvalidParams(f"{loaded.method}: {exc}") from None
    try:
        result = unlearn_lm(
            loaded.model, loaded.forget, loaded.guard, loaded.member_probe, cfg, progress
        )
    except ValueError as exc:  # θ matches nothing, or a per-record gradient exceeds the bound
        raise InvalidParams(f"{loaded.method}: {exc}") from None
    stats = dict(result.stats)
    selection = stats.get("selection")
    if isinstance(selection, dict):
        kept = selection.pop("kept_indices", None)
        if kept is not None:
            stats["kept_key_sha256"] = [key_hash(int(i)) for i in list(kept)[:1000]]
    stats["config"] = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "device"}
    return dict(jsonable(stats))


# Evaluating -------------------------------------------------------------------------------
def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def lm_metrics(loaded: Loaded) -> dict[str, Any]:
    """Per-split text metrics on the forget set, the eval policy half and the member probe;
    the attack AUCs forget vs policy half with the 0.5 + 2·SE limit the policy compares with."""
    from worker.imu.checks import loss_auc
    from worker.imu.text_metrics import MIN_K, evaluate_lm
    from worker.job_metrics import jsonable

    start = time.perf_counter()
    out = evaluate_lm(loaded.model, loaded.forget, loaded.eval, loaded.member_probe)
    out["min_k_fraction"] = MIN_K
    if loaded.eval is not None and "attacks" in out:
        zeros = (torch.zeros(len(loaded.forget)), torch.zeros(len(loaded.eval)))
        out["attacks"]["auc_limit"] = loss_auc(*zeros)[1]
    out["n_forget"] = len(loaded.forget)
    out["n_eval"] = len(loaded.eval) if loaded.eval is not None else 0
    out["n_member_probe"] = len(loaded.member_probe) if loaded.member_probe is not None else 0
    out["eval_seconds"] = time.perf_counter() - start
    out["peak_rss_mib"] = _peak_rss_mib()
    return dict(jsonable(out))


# Saving -----------------------------------------------------------------------------------
def lm_state_dict(
    model: torch.nn.Module, layout: dict[str, torch.dtype] | None = None
) -> dict[str, torch.Tensor]:
    """The state dict in the layout version 1 was registered with: the same keys (a tied
    weight under the name it was stored under) and the same dtypes (a bf16 checkpoint stays
    bf16). Without a layout, each tied parameter under its first name (save_pretrained's)."""
    from worker.imu.language_models import tied_groups

    state = model.state_dict()
    if layout is not None:
        return {key: state[key].to(dtype) for key, dtype in layout.items()}
    for group in tied_groups(model):
        for name in group[1:]:
            state.pop(name, None)
    return state
