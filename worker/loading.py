"""The loading phase: the job's inputs from the database, its checkpoint and its datasets.

Parsed dataset files are cached per process (worker.dataset_cache.DATASETS): the eval and
member-probe sets are read by every job of a model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.domain.states import Phase, VersionStatus
from service.ingest.datasets_io import TensorData
from service.storage.db import transaction
from service.storage.sql import chunked
from service.storage.tables import Dataset, DeletionRequest, Job, Model, ModelVersion, Record
from worker.context import RunnerContext
from worker.dataset_cache import DATASETS
from worker.errors import JobError, SourceChanged, checkpoint_corrupt, unsupported_dataset
from worker.heldout import EvalSplit, split_eval_keys

Pair = tuple[Any, Any]  # (inputs, labels) tensors


@dataclass(frozen=True)
class DataSource:
    """Where a dataset's current file is (a purge may replace it while a job runs)."""

    kind: str
    storage_key: str
    name: str
    content_sha256: str
    dataset_id: str

    @classmethod
    def of(cls, dataset: Dataset) -> DataSource:
        return cls(
            dataset.kind, dataset.storage_key, dataset.name, dataset.content_sha256, dataset.id
        )


@dataclass(frozen=True)
class JobInputs:
    """What the loading transaction reads; the files are fetched after it commits."""

    model_id: str
    architecture: str
    arch_kwargs: dict[str, Any]
    version_id: str
    version_number: int
    version_key: str | None
    version_sha256: str
    dataset: DataSource
    eval: DataSource | None
    probe: DataSource | None
    eval_keys: list[str] | None  # present records of the eval set, in file order
    probe_keys: list[str] | None
    method: str
    params: dict[str, Any]
    keys: list[str]
    recipe: dict[str, Any] | None = None
    # The recipe's datasets with their present keys, when the model has a recipe.
    recipe_sources: tuple[tuple[DataSource, tuple[str, ...]], ...] = ()
    created_at: Any = None  # the job's (= its request's) arrival


@dataclass
class Loaded:
    """The splits are (inputs, labels) tensor pairs, or TokenBatches when ``lm``."""

    model: Any  # torch.nn.Module
    forget: Any
    eval: Any | None
    member_probe: Any | None
    method: str
    params: dict[str, Any]
    keys: list[str]
    dataset_id: str
    source_version_id: str
    class_wise: bool = False
    guard: Any | None = None  # eval records the calibration may look at
    nonmembers: Any | None = None  # the whole eval set: the membership test's null
    eval_rows: list[int] | None = None  # where ``eval`` sits in ``nonmembers``
    members: Any | None = None  # a seeded sample of the retained training records
    eval_split: dict[str, Any] | None = None
    lm: bool = False  # a causal LM (worker/lm_job.py)
    layout: dict[str, Any] | None = None  # LM: the registered keys -> torch dtypes, kept on save
    architecture: str = ""
    arch_kwargs: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None  # usable for exact retraining (see exact_route)
    # The recipe's training rows minus the forget set (a Pair; an LM: worker.lm_retrain).
    retained: Callable[[], Any] | None = None
    exact_route: str | None = None  # why no exact route, when the model has a recipe
    served: tuple[Any, ...] = ()  # worker.coalescing.Member: other requests this run answers


def loaded_from(inputs: JobInputs, split: EvalSplit | None, **fields: Any) -> Loaded:
    """A Loaded whose request fields (method, params, keys, ids, eval split) come from
    ``inputs``; the caller gives the model and the record sets (classifier or LM loader)."""
    return Loaded(
        method=inputs.method,
        params=inputs.params,
        keys=inputs.keys,
        dataset_id=inputs.dataset.dataset_id,
        source_version_id=inputs.version_id,
        eval_split=split.describe() if split else None,
        **fields,
    )


class Loader:
    """Reads one job's inputs; `progress(phase, fraction)` also checks for cancellation."""

    def __init__(
        self,
        ctx: RunnerContext,
        job_id: str,
        progress: Callable[[str, float], None],
        coalesce: Callable[[JobInputs, Callable[[Any], bool]], list[Any]] | None = None,
    ):
        self.ctx, self.job_id, self.progress = ctx, job_id, progress
        self.coalesce = coalesce  # takes in queued requests that share this run

    def load(self) -> Loaded:
        inputs = self._read_inputs()
        self.progress(Phase.LOADING, 0.1)
        from service.domain.lm_registration import is_lm
        from worker.lm_job import load_lm

        if is_lm(inputs.architecture):
            return load_lm(self, inputs, inputs.model_id, self.ctx.device)
        served: tuple[Any, ...] = ()
        if self.coalesce is not None:
            served = tuple(self.coalesce(inputs, self.whole_class_test(inputs.dataset)))
            extra = [k for m in served for k in m.keys]
            inputs = replace(inputs, keys=[*inputs.keys, *extra]) if extra else inputs
        model = self._load_model(inputs)
        self.progress(Phase.LOADING, 0.4)
        forget = self._load_rows(inputs.dataset, inputs.keys)
        class_wise = self.whole_class_test(inputs.dataset)(inputs.keys)
        self.progress(Phase.LOADING, 0.6)
        eval_pair = guard_pair = split = nonmembers = members = eval_rows = None
        if inputs.eval:
            eval_keys = inputs.eval_keys
            if eval_keys is None:
                eval_keys = [str(k) for k in self.dataset(inputs.eval).ids]
            split = split_eval_keys(eval_keys)
            eval_pair = self._load_rows(inputs.eval, split.policy)
            guard_pair = self._load_rows(inputs.eval, split.guard)
            nonmembers = self._load_rows(inputs.eval, eval_keys)
            position = {k: i for i, k in enumerate(eval_keys)}
            eval_rows = [position[k] for k in split.policy]
            member_keys = self._member_keys(inputs)
            if member_keys:
                members = self._load_rows(inputs.dataset, member_keys)
        probe_pair = self._load_rows(inputs.probe, inputs.probe_keys) if inputs.probe else None
        self.progress(Phase.LOADING, 0.8)
        return loaded_from(
            inputs,
            split,
            model=model,
            forget=forget,
            eval=eval_pair,
            member_probe=probe_pair,
            guard=guard_pair,
            class_wise=class_wise,
            nonmembers=nonmembers,
            members=members,
            eval_rows=eval_rows,
            architecture=inputs.architecture,
            arch_kwargs=inputs.arch_kwargs,
            served=served,
            **self._exact_route(inputs),
        )

    def _exact_route(self, inputs: JobInputs) -> dict[str, Any]:
        """The recipe and a loader of its retained rows, or why retraining cannot answer."""
        if not inputs.recipe:
            return {}
        sources = dict((s.dataset_id, (s, keys)) for s, keys in inputs.recipe_sources)
        if inputs.dataset.dataset_id not in sources:
            return {"exact_route": "the request's dataset is not among the recipe's datasets"}
        forget = set(inputs.keys)

        def retained() -> Pair:
            import torch

            parts = []
            for source, keys in inputs.recipe_sources:
                if source.dataset_id == inputs.dataset.dataset_id:
                    keys = tuple(k for k in keys if k not in forget)
                if keys:
                    parts.append(self._load_rows(source, list(keys)))
            if not parts:
                raise JobError(
                    "nothing-to-train-on",
                    "Nothing to train on",
                    "the request names every record the recipe trains on: no model can be "
                    "trained without them",
                )
            return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

        return {"recipe": inputs.recipe, "retained": retained}

    def _member_keys(self, inputs: JobInputs) -> list[str] | None:
        """Up to MAX_MEMBERS retained records of the forget set's dataset, a sample seeded
        by the source version (the same for every attempt of a job); None when none remain."""
        from worker.imu.membership import MAX_MEMBERS

        forget = set(inputs.keys)
        retained = [str(k) for k in self.dataset(inputs.dataset).ids if str(k) not in forget]
        if not retained:
            return None
        if len(retained) > MAX_MEMBERS:
            seed = int(hashlib.sha256(inputs.version_id.encode()).hexdigest()[:8], 16)
            pick = np.random.default_rng(seed).choice(len(retained), MAX_MEMBERS, replace=False)
            retained = [retained[i] for i in sorted(pick.tolist())]
        return retained

    # Database --------------------------------------------------------------------------
    def _read_inputs(self) -> JobInputs:
        with transaction(self.ctx.session_factory) as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            request = session.get(DeletionRequest, job.request_id)
            model_row = session.get(Model, job.model_id)
            version = session.get(ModelVersion, job.source_version_id)
            assert request is not None and model_row is not None and version is not None
            dataset = session.get(Dataset, request.dataset_id)
            if dataset is None:
                raise JobError(
                    "dataset-missing", "Dataset missing", "the dataset is gone", status=404
                )
            keys = [str(k) for k in request.record_keys]
            _check_records(session, dataset.id, keys)
            eval_ds = _optional(session, model_row.eval_dataset_id)
            probe_ds = _optional(session, model_row.member_probe_dataset_id)
            return JobInputs(
                model_id=model_row.id,
                architecture=model_row.architecture,
                arch_kwargs=dict(model_row.arch_kwargs or {}),
                version_id=version.id,
                version_number=version.number,
                version_key=version.storage_key,
                version_sha256=version.sha256,
                dataset=DataSource.of(dataset),
                eval=DataSource.of(eval_ds) if eval_ds else None,
                probe=DataSource.of(probe_ds) if probe_ds else None,
                eval_keys=_present_keys(session, eval_ds),
                probe_keys=_present_keys(session, probe_ds),
                method=job.method,
                params=dict(job.params or {}),
                keys=keys,
                recipe=model_row.recipe,
                recipe_sources=_recipe_sources(session, model_row.recipe),
                created_at=job.created_at,
            )

    def current_source(self, dataset_id: str) -> DataSource | None:
        with transaction(self.ctx.session_factory) as session:
            dataset = session.get(Dataset, dataset_id)
            return DataSource.of(dataset) if dataset is not None else None

    # Storage ---------------------------------------------------------------------------
    def read_object(self, key: str | None, what: str) -> bytes:
        if not key:
            raise JobError("checkpoint-missing", f"{what} missing", f"{what} has no stored file")
        try:
            with self.ctx.storage.open_read(key) as fh:
                return fh.read()
        except FileNotFoundError:
            raise JobError(
                f"{'checkpoint' if 'checkpoint' in what else 'dataset'}-missing",
                f"{what} missing",
                f"{what} ({key}) is not in storage",
                status=500,
            ) from None

    def _load_model(self, inputs: JobInputs) -> Any:
        from worker.imu.architectures import build
        from worker.imu.checkpoints import load_safetensors_into

        data = self.checkpoint_bytes(inputs)
        try:
            model = build(inputs.architecture, **inputs.arch_kwargs)
        except (ValueError, TypeError, KeyError) as exc:
            raise JobError("architecture-invalid", "Architecture invalid", str(exc)) from None
        try:
            load_safetensors_into(model, data)
        except (ValueError, RuntimeError) as exc:
            raise checkpoint_corrupt(
                "Checkpoint corrupt",
                f"the checkpoint of version {inputs.version_number} cannot be loaded into "
                f"{inputs.architecture}: {exc}",
            ) from None
        return model

    def checkpoint_bytes(self, inputs: JobInputs) -> bytes:
        """The source version's safetensors, sha256-checked."""
        what = f"checkpoint of version {inputs.version_number}"
        try:
            data = self.read_object(inputs.version_key, what)
        except JobError:
            # A promotion may have superseded (and retired) our source since the claim:
            # then retry from the new active version instead of failing the job.
            with transaction(self.ctx.session_factory) as session:
                status = session.execute(
                    select(ModelVersion.status).where(ModelVersion.id == inputs.version_id)
                ).scalar_one_or_none()
            if status != VersionStatus.ACTIVE:
                raise SourceChanged(
                    f"version {inputs.version_number} is {status} and its checkpoint retired; "
                    "the job restarts from the active version"
                ) from None
            raise
        digest = hashlib.sha256(data).hexdigest()
        if digest != inputs.version_sha256:
            raise checkpoint_corrupt(
                "Checkpoint corrupt",
                f"the {what} ({inputs.version_key}) has sha256 {digest[:16]}…, but "
                f"{inputs.version_sha256[:16]}… was registered: the stored file was altered or "
                "damaged",
            )
        return data

    def read_dataset(
        self, source: DataSource, cached: Callable[[DataSource], Any] | None = None
    ) -> tuple[DataSource, Any]:
        """The current file of a dataset (or what ``cached`` has for it), and the source it
        came from. A purge may have replaced the file since its key was read: follow the
        dataset to its new file."""
        for _ in range(5):
            hit = cached(source) if cached is not None else None
            if hit is not None:
                return source, hit
            try:
                return source, self.read_object(source.storage_key, f"dataset {source.name!r}")
            except JobError:
                current = self.current_source(source.dataset_id)
                if current is None or current.storage_key == source.storage_key:
                    raise
                source = current
        raise SourceChanged(f"dataset {source.name!r} kept changing while it was read")

    def dataset(self, source: DataSource) -> TensorData:
        """The parsed current file of a tensor dataset (cached by file and content)."""
        from service.ingest.datasets_io import load_tensor_npz

        def cached(s: DataSource) -> TensorData | None:
            return DATASETS.get((s.storage_key, s.content_sha256))

        source, got = self.read_dataset(source, cached)
        if not isinstance(got, bytes):
            return got
        data = load_tensor_npz(got)
        DATASETS.evict_other_files(source.storage_key)
        DATASETS.put((source.storage_key, source.content_sha256), data)
        return data

    def whole_class_test(self, source: DataSource) -> Callable[[Any], bool]:
        """keys -> whether they are every record of their classes left in the dataset."""
        # No fallback: an error here is the job's (a silent "not class-wise" would change
        # which release policy judges it).
        data = self.dataset(source)
        label_of = {str(key): int(label) for key, label in zip(data.ids, data.labels, strict=True)}
        sizes: dict[int, int] = {}
        for label in label_of.values():
            sizes[label] = sizes.get(label, 0) + 1

        def whole(keys: Any) -> bool:
            counts: dict[int, int] = {}
            for key in set(keys):
                if key in label_of:
                    counts[label_of[key]] = counts.get(label_of[key], 0) + 1
            return bool(counts) and all(sizes[label] == n for label, n in counts.items())

        return whole

    def _load_rows(self, source: DataSource, keys: list[str] | None) -> Pair:
        import torch

        from service.ingest.datasets_io import DatasetError, select_rows

        if source.kind != "tensor":
            raise unsupported_dataset(
                source.name, source.kind, "this worker unlearns tensor datasets"
            )
        try:
            data = self.dataset(source)
            inputs, labels = select_rows(data, keys if keys is not None else data.ids)
        except DatasetError as exc:
            raise JobError(
                "dataset-invalid", "Dataset unreadable", f"{source.name}: {exc}"
            ) from None
        except KeyError as exc:
            raise JobError(
                "records-unavailable", "Records unavailable", f"{source.name}: {exc.args[0]}"
            ) from None
        x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
        return x, y


def _optional(session: Session, dataset_id: str | None) -> Dataset | None:
    return session.get(Dataset, dataset_id) if dataset_id else None


def _check_records(session: Session, dataset_id: str, keys: list[str]) -> None:
    if not keys:
        raise JobError(
            "records-unavailable", "No records to forget", "the request names no records"
        )
    states: dict[str, str] = {}
    for chunk in chunked(keys):
        for key, state in session.execute(
            select(Record.key, Record.state).where(
                Record.dataset_id == dataset_id, Record.key.in_(chunk)
            )
        ):
            states[key] = state
    problems = [
        {"key": k, "reason": "not in the dataset" if k not in states else "already forgotten"}
        for k in keys
        if states.get(k) != "present"
    ]
    if problems:
        raise JobError(
            "records-unavailable",
            "Records unavailable",
            f"{len(problems)} of the requested records are missing or already forgotten",
            errors=problems[:100],
        )


def _recipe_sources(
    session: Session, recipe: dict[str, Any] | None
) -> tuple[tuple[DataSource, tuple[str, ...]], ...]:
    if not recipe:
        return ()
    out = []
    for dataset_id in recipe.get("datasets") or []:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise JobError(
                "dataset-missing",
                "Recipe dataset missing",
                f"the recipe's dataset {dataset_id} is gone",
                status=404,
            )
        out.append((DataSource.of(dataset), tuple(_present_keys(session, dataset) or [])))
    return tuple(out)


def _present_keys(session: Session, dataset: Dataset | None) -> list[str] | None:
    if dataset is None:
        return None
    return list(
        session.execute(
            select(Record.key)
            .where(Record.dataset_id == dataset.id, Record.state == "present")
            .order_by(Record.row)
        ).scalars()
    )
