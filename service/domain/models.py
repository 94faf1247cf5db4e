"""Model registration (version 1) and model/version queries.

Weights are streamed into storage, then only the safetensors header is read and compared
with the architecture built on the meta device. Nothing is ever unpickled: a pickle, a zip or
garbage fails the header parse and is refused with 422; the stored file is removed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service import engine
from service.domain.datasets import resolve_dataset, too_large
from service.domain.lm_recipe import LMRecipeIn, resolve_lm_recipe
from service.domain.lm_registration import (
    LMFiles,
    check_lm_weights,
    file_key,
    is_lm,
    lm_arch_kwargs,
    read_lm_files,
    store_lm_files,
)
from service.domain.pagination import MAX_LIMIT, decode_cursor, page
from service.domain.states import VersionStatus
from service.domain.views import model_view, version_view
from service.errors import Invalid, conflict, not_found, validation
from service.ingest.textcheck import check_json
from service.storage.db import transaction
from service.storage.objects import Storage, TooLarge
from service.storage.tables import Model, ModelVersion, new_id
from service.trust.audit import append_event

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,199}$")


class RecipeIn(BaseModel):
    """How version 1 was trained, so that a request can be answered exactly by retraining
    without its records (worker.imu.recipe; ALGORITHM.md §7). The trainer is the engine's
    `fit`: Adam on cross-entropy from weights initialised after `torch.manual_seed(init_seed)`."""

    model_config = ConfigDict(extra="forbid", title="TrainingRecipe")

    optimizer: Literal["adam"] = "adam"
    epochs: int = Field(ge=1, le=100_000, strict=True)
    lr: float = Field(gt=0, le=10, allow_inf_nan=False)
    batch_size: int = Field(default=128, ge=1, le=1 << 20, strict=True)
    weight_decay: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)
    seed: int = Field(default=0, ge=0, le=(1 << 63) - 1, strict=True)
    init_seed: int = Field(default=0, ge=0, le=(1 << 63) - 1, strict=True)
    datasets: list[str] = Field(
        min_length=1,
        max_length=16,
        description="The train datasets (ids or unique names) version 1 was trained on, in order.",
    )


class ModelSpec(BaseModel):
    """The `spec` form field of POST /v1/models."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME_RE.pattern, max_length=200)
    architecture: str = Field(min_length=1, max_length=200)
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    eval_dataset: str | None = None
    member_probe_dataset: str | None = None
    description: str | None = Field(default=None, max_length=10_000)
    recipe: dict[str, Any] | None = Field(
        default=None,
        description="TrainingRecipe (classifiers) or LMTrainingRecipe (causal_lm), checked "
        "by architecture.",
    )
    # The recipe parsed by the class its architecture takes (parse_spec).
    _recipe: RecipeIn | LMRecipeIn | None = PrivateAttr(default=None)

    @property
    def parsed_recipe(self) -> RecipeIn | LMRecipeIn | None:
        return self._recipe


def _field_errors(exc: ValidationError, prefix: str) -> list[dict[str, Any]]:
    return [
        {
            "field": ".".join([prefix, *(str(p) for p in e["loc"])]),
            "message": e["msg"],
        }
        for e in exc.errors()
    ]


def parse_spec(raw: str) -> ModelSpec:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise validation(
            f"spec is not valid JSON: {exc.msg}", [{"field": "spec", "message": "invalid JSON"}]
        ) from None
    check_json(data, "spec")  # the JSON inside the form field: `\u0000` escapes decode here
    try:
        spec = ModelSpec.model_validate(data)
        if spec.recipe is not None:  # by architecture: one class, errors named by its fields
            cls = LMRecipeIn if is_lm(spec.architecture) else RecipeIn
            try:
                spec._recipe = cls.model_validate(spec.recipe)
            except ValidationError as exc:
                errors = _field_errors(exc, "spec.recipe")
                raise validation(
                    "invalid spec: " + ", ".join(e["field"] for e in errors), errors
                ) from None
    except ValidationError as exc:
        errors = _field_errors(exc, "spec")
        raise validation("invalid spec: " + ", ".join(e["field"] for e in errors), errors) from None
    if ".." in spec.name:
        raise validation(
            f"invalid model name {spec.name!r}", [{"field": "spec.name", "message": "'..'"}]
        )
    return spec


def _check_weights(
    storage: Storage, key: str, spec: ModelSpec, lm_files: LMFiles | None = None
) -> dict[str, Any]:
    try:
        with storage.open_read(key) as fh:
            header = engine.read_header(fh)
    except ValueError as exc:
        raise Invalid(
            "invalid-checkpoint",
            f"weights must be a .safetensors file ({exc}); pickled checkpoints are refused",
            title="Invalid checkpoint",
            errors=[{"field": "weights", "message": str(exc)}],
        ) from None
    if lm_files is not None:
        result = check_lm_weights(lm_files, header)
    else:
        try:
            result = engine.check_state_dict(spec.architecture, spec.arch_kwargs, header)
        except (ValueError, KeyError) as exc:  # unknown architecture or bad kwargs
            field = "spec.architecture" if isinstance(exc, KeyError) else "spec.arch_kwargs"
            message = str(exc.args[0]) if exc.args else str(exc)
            if isinstance(exc, KeyError):  # causal_lm is registered here, not by the engine
                names = ", ".join([*engine.architectures(), "causal_lm"])
                message = f"unknown architecture {spec.architecture!r}; available: {names}"
            raise validation(message, [{"field": field, "message": message}]) from None
    if not result.ok:
        errors = (
            [{"field": "weights", "key": k, "message": "missing"} for k in result.missing]
            + [{"field": "weights", "key": k, "message": "unexpected"} for k in result.unexpected]
            + [
                {"field": "weights", "message": "mismatched", **m.to_dict()}
                for m in result.mismatched
            ]
        )
        raise Invalid(
            "architecture-mismatch",
            f"the weights do not match architecture {spec.architecture!r}: {result.describe()}",
            title="Checkpoint does not match the architecture",
            errors=errors,
            missing=result.missing,
            unexpected=result.unexpected,
            mismatched=[m.to_dict() for m in result.mismatched],
        )
    return {"tensors": len(header)}


def _resolve_recipe(
    session: Session, storage: Storage, spec: ModelSpec, lm_files: LMFiles | None
) -> dict[str, Any] | None:
    """The recipe as stored: its datasets resolved to ids, each a tensor train dataset
    (a causal LM's: service.domain.lm_recipe)."""
    recipe = spec.parsed_recipe
    if recipe is None:
        return None
    if isinstance(recipe, LMRecipeIn):
        assert lm_files is not None
        return resolve_lm_recipe(session, storage, recipe, lm_files)
    ids = []
    for i, ref in enumerate(recipe.datasets):
        field = f"spec.recipe.datasets.{i}"
        ds = resolve_dataset(session, ref, field)
        if ds.role != "train" or ds.kind != "tensor":
            raise validation(
                f"{field} {ds.id!r} is a {ds.kind} {ds.role} dataset; a recipe trains on "
                "tensor train datasets",
                [{"field": field, "message": "must be a tensor dataset with role train"}],
            )
        ids.append(ds.id)
    return {**recipe.model_dump(), "datasets": ids}


def register_model(
    factory: sessionmaker[Session],
    storage: Storage,
    *,
    spec_json: str,
    weights: Iterable[bytes],
    max_bytes: int | None,
    actor: str,
    lm_uploads: Mapping[str, Iterable[bytes] | None] | None = None,
) -> dict[str, Any]:
    """Version 1 of a new model. ``lm_uploads`` (form field -> chunks or None) carries the
    JSON files of a ``causal_lm`` (service.domain.lm_registration)."""
    spec = parse_spec(spec_json)
    lm_files = read_lm_files(spec.architecture, lm_uploads or {})
    arch_kwargs = lm_arch_kwargs(spec.arch_kwargs, lm_files) if lm_files else spec.arch_kwargs
    with factory() as session:
        if session.execute(select(Model.id).where(Model.name == spec.name)).first():
            raise conflict("model-exists", f"a model named {spec.name!r} already exists")
        eval_ds = probe_ds = None
        if spec.eval_dataset:
            eval_ds = resolve_dataset(session, spec.eval_dataset, "spec.eval_dataset")
        if spec.member_probe_dataset:
            probe_ds = resolve_dataset(
                session, spec.member_probe_dataset, "spec.member_probe_dataset"
            )
        recipe = _resolve_recipe(session, storage, spec, lm_files)
    for ds, role, field in (
        (eval_ds, "eval", "spec.eval_dataset"),
        (probe_ds, "member_probe", "spec.member_probe_dataset"),
    ):
        if ds is not None and ds.role != role:
            raise validation(
                f"{field} {ds.id!r} has role {ds.role!r}, expected {role!r}",
                [{"field": field, "message": f"role must be {role}"}],
            )
        kind = "text" if lm_files is not None else "tensor"
        if ds is not None and ds.kind != kind:
            raise validation(
                f"{field} {ds.id!r} is a {ds.kind} dataset; architecture "
                f"{spec.architecture!r} is evaluated on {kind} datasets",
                [{"field": field, "message": f"kind must be {kind}"}],
            )

    model_id, version_id = new_id(), new_id()
    key = f"checkpoints/{model_id}/{version_id}.safetensors"
    try:
        sha, size = storage.write_stream(key, weights, max_bytes=max_bytes)
    except TooLarge as exc:
        raise too_large(exc.limit) from None
    written = [key]
    try:
        info = _check_weights(storage, key, spec, lm_files)
        if lm_files is not None:
            written += [file_key(model_id, name) for name in lm_files.contents]
            store_lm_files(storage, model_id, lm_files)
        with transaction(factory) as session:
            model = Model(
                id=model_id,
                name=spec.name,
                architecture=spec.architecture,
                arch_kwargs=arch_kwargs,
                description=spec.description,
                eval_dataset_id=eval_ds.id if eval_ds else None,
                member_probe_dataset_id=probe_ds.id if probe_ds else None,
                recipe=recipe,
            )
            session.add(model)
            session.flush()
            version = ModelVersion(
                id=version_id,
                model_id=model_id,
                number=1,
                parent_id=None,
                job_id=None,
                storage_key=key,
                sha256=sha,
                size_bytes=size,
                status=VersionStatus.ACTIVE,
                metrics={},
            )
            session.add(version)
            session.flush()
            append_event(
                session,
                actor=actor,
                action="model.registered",
                subject_type="model",
                subject_id=model_id,
                payload={
                    "name": spec.name,
                    "architecture": spec.architecture,
                    "arch_kwargs": arch_kwargs,
                    "eval_dataset_id": model.eval_dataset_id,
                    "member_probe_dataset_id": model.member_probe_dataset_id,
                    "recipe": recipe,
                },
            )
            append_event(
                session,
                actor=actor,
                action="version.created",
                subject_type="model_version",
                subject_id=version_id,
                payload={
                    "model": spec.name,
                    "number": 1,
                    "sha256": sha,
                    "size_bytes": size,
                    "status": VersionStatus.ACTIVE,
                    "tensors": info["tensors"],
                },
            )
            view = model_view(model, version)
    except IntegrityError:
        _delete_all(storage, written)
        raise conflict("model-exists", f"a model named {spec.name!r} already exists") from None
    except BaseException:
        _delete_all(storage, written)
        raise
    return {**view, "warnings": registration_warnings(spec)}


def registration_warnings(spec: ModelSpec) -> list[str]:
    """What the registration will cost later, said now (the answer is 201 all the same)."""
    out = []
    if not spec.eval_dataset:
        out.append(
            "no eval_dataset: nothing can be compared with unseen data, so every deletion "
            "request will be held for review. Upload held-out records (role eval, drawn like "
            "the training set) and register the model with `eval_dataset`."
        )
    return out


def _delete_all(storage: Storage, keys: list[str]) -> None:
    for key in keys:
        storage.delete(key)


def get_model(session: Session, name: str) -> Model:
    model = session.execute(select(Model).where(Model.name == name)).scalar_one_or_none()
    if model is None:
        names = session.execute(select(Model.name).limit(10_000)).scalars().all()
        raise not_found("model", name, names)
    return model


def model_and_active_id(session: Session, name: str) -> tuple[Model, str | None]:
    """The model and the id of its active version (None without one), in one statement."""
    row = session.execute(
        select(Model, ModelVersion.id)
        .outerjoin(
            ModelVersion,
            (ModelVersion.model_id == Model.id) & (ModelVersion.status == VersionStatus.ACTIVE),
        )
        .where(Model.name == name)
        .limit(1)
    ).first()
    if row is None:
        return get_model(session, name), None  # raises the 404, with suggestions
    return row[0], row[1]


def active_version(session: Session, model_id: str) -> ModelVersion | None:
    return session.execute(
        select(ModelVersion)
        .where(ModelVersion.model_id == model_id, ModelVersion.status == VersionStatus.ACTIVE)
        .order_by(ModelVersion.number.desc())
        .limit(1)
    ).scalar_one_or_none()


def show_model(factory: sessionmaker[Session], name: str) -> dict[str, Any]:
    with factory() as session:
        model = get_model(session, name)
        return model_view(model, active_version(session, model.id))


def list_models(
    factory: sessionmaker[Session], *, cursor: str | None, limit: int
) -> dict[str, Any]:
    limit = min(limit, MAX_LIMIT)
    after = decode_cursor(cursor, 1)
    with factory() as session:
        q = select(Model).order_by(Model.name)
        if after:
            q = q.where(Model.name > str(after[0]))
        rows = list(session.execute(q.limit(limit + 1)).scalars())
        items, next_cursor = page(rows, limit, lambda m: [m.name])
        return {
            "items": [model_view(m, active_version(session, m.id)) for m in items],
            "next_cursor": next_cursor,
        }


def list_versions(
    factory: sessionmaker[Session], name: str, *, cursor: str | None, limit: int
) -> dict[str, Any]:
    limit = min(limit, MAX_LIMIT)
    after = decode_cursor(cursor, 1)
    with factory() as session:
        model = get_model(session, name)
        q = (
            select(ModelVersion)
            .where(ModelVersion.model_id == model.id)
            .order_by(ModelVersion.number.desc())
        )
        if after:
            q = q.where(ModelVersion.number < int(after[0]))
        rows = list(session.execute(q.limit(limit + 1)).scalars())
        items, next_cursor = page(rows, limit, lambda v: [v.number])
        return {"items": [version_view(v, model.name) for v in items], "next_cursor": next_cursor}


def get_version(session: Session, version_id: str) -> tuple[ModelVersion, Model]:
    version = session.get(ModelVersion, version_id)
    if version is None:
        raise not_found("model version", version_id)
    model = session.get(Model, version.model_id)
    assert model is not None
    return version, model


def show_version(factory: sessionmaker[Session], version_id: str) -> dict[str, Any]:
    with factory() as session:
        version, model = get_version(session, version_id)
        view = version_view(version, model.name)
        # Lineage: the chain of parents back to version 1.
        lineage: list[dict[str, Any]] = []
        parent_id = version.parent_id
        while parent_id is not None and len(lineage) < 10_000:
            parent = session.get(ModelVersion, parent_id)
            if parent is None:
                break
            lineage.append({"id": parent.id, "number": parent.number, "job_id": parent.job_id})
            parent_id = parent.parent_id
        view["lineage"] = lineage
        return view
