"""Registration of a causal language model (architecture ``causal_lm``).

Beside the spec and ``model.safetensors`` an LM needs three JSON files, uploaded in the same
multipart POST /v1/models: ``config`` (config.json), ``tokenizer`` (tokenizer.json) and
``tokenizer_config`` (tokenizer_config.json). They are read into memory (bounded), checked
without running any code from them (worker.imu.language_models: allowlisted ``model_type``,
no ``auto_map``/remote code, the model built on the meta device and compared with the
safetensors header, the tokenizer loaded by ``tokenizers`` from JSON) and stored once per
model under ``models/<model id>/files/<name>``: unlearning changes only the weights, so every
version of the model shares them. Their sha256 values are kept in the model's
``arch_kwargs["files"]`` and checked again by the worker before it uses them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service import engine
from service.errors import Invalid, NotFound, not_found, validation
from service.storage.objects import Storage

ARCHITECTURE = "causal_lm"
# form field -> stored file name
FORM_FILES: dict[str, str] = {
    "config": "config.json",
    "tokenizer": "tokenizer.json",
    "tokenizer_config": "tokenizer_config.json",
}
FILE_NAMES = tuple(FORM_FILES.values())


def file_key(model_id: str, name: str) -> str:
    return f"models/{model_id}/files/{name}"


def is_lm(architecture: str) -> bool:
    return architecture == ARCHITECTURE


def _limits() -> dict[str, int]:
    lm = engine.language_models()

    return {
        "config": lm.MAX_CONFIG_BYTES,
        "tokenizer": lm.MAX_TOKENIZER_BYTES,
        "tokenizer_config": lm.MAX_TOKENIZER_CONFIG_BYTES,
    }


def _invalid(field: str, message: str, slug: str = "invalid-model-file") -> Invalid:
    return Invalid(
        slug,
        f"{field}: {message}",
        title="Invalid model file",
        errors=[{"field": field, "message": message}],
    )


def _read(field: str, chunks: Iterable[bytes], limit: int) -> bytes:
    out = bytearray()
    for chunk in chunks:
        out += chunk
        if len(out) > limit:
            raise _invalid(field, f"larger than {limit} bytes")
    if not out:
        raise _invalid(field, "the file is empty")
    return bytes(out)


@dataclass(frozen=True)
class LMFiles:
    """The checked JSON files of a causal LM, by stored name."""

    contents: dict[str, bytes]

    @property
    def config(self) -> bytes:
        return self.contents["config.json"]

    def digests(self) -> dict[str, dict[str, Any]]:
        return {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}
            for name, data in self.contents.items()
        }


def read_lm_files(
    architecture: str, uploads: Mapping[str, Iterable[bytes] | None]
) -> LMFiles | None:
    """The uploaded files for a causal LM (all required), None for other architectures
    (which must not send them). Each file is checked on its own here; ``check_weights``
    compares the config with the weights."""
    given = [field for field, chunks in uploads.items() if chunks is not None]
    if not is_lm(architecture):
        if given:
            raise validation(
                f"{', '.join(given)}: only architecture {ARCHITECTURE!r} takes these files",
                [{"field": f, "message": f"only for {ARCHITECTURE}"} for f in given],
            )
        return None
    missing = [field for field in FORM_FILES if uploads.get(field) is None]
    if missing:
        raise validation(
            f"architecture {ARCHITECTURE!r} needs the form fields {', '.join(FORM_FILES)}; "
            f"missing: {', '.join(missing)}",
            [{"field": f, "message": "required for causal_lm"} for f in missing],
        )
    lm = engine.language_models()

    limits = _limits()
    raw = {field: _read(field, uploads[field] or (), limits[field]) for field in FORM_FILES}
    field = "config"
    try:
        lm.validate_config(raw["config"])
        field = "tokenizer"
        tokenizer = lm.load_tokenizer(raw["tokenizer"])
        field = "tokenizer_config"
        lm.validate_tokenizer_config(raw["tokenizer_config"])
    except ValueError as exc:
        raise _invalid(field, str(exc)) from None
    try:
        lm.build_config(raw["config"])  # transformers' own checks of the values
        lm.check_tokenizer(raw["config"], tokenizer)
    except ValueError as exc:
        raise _invalid("config", str(exc)) from None
    return LMFiles({FORM_FILES[field]: data for field, data in raw.items()})


def check_lm_weights(files: LMFiles, header: Mapping[str, Any]) -> Any:
    """The StateDictCheck of the weights against the model config.json describes (meta)."""

    try:
        return engine.check_causal_lm(files.config, header)
    except ValueError as exc:
        raise _invalid("config", str(exc)) from None


def store_lm_files(storage: Storage, model_id: str, files: LMFiles) -> list[str]:
    keys = []
    for name, data in files.contents.items():
        key = file_key(model_id, name)
        keys.append(key)
        storage.write_bytes(key, data)
    return keys


def lm_arch_kwargs(spec_kwargs: Mapping[str, Any], files: LMFiles) -> dict[str, Any]:
    """What the model row keeps: the files' digests (the worker re-checks them)."""
    if spec_kwargs:
        raise validation(
            f"spec.arch_kwargs must be empty for {ARCHITECTURE!r}: config.json describes the model",
            [{"field": "spec.arch_kwargs", "message": "must be {} for causal_lm"}],
        )
    return {"files": files.digests()}


@dataclass(frozen=True)
class StoredFile:
    key: str
    sha256: str
    local: Any  # a pathlib.Path on local storage, else None
    storage: Storage

    def read(self) -> bytes:
        with self.storage.open_read(self.key) as fh:
            return fh.read()


def model_file(
    factory: sessionmaker[Session], storage: Storage, version_id: str, name: str
) -> StoredFile:
    """One of a causal LM version's JSON files; 404 problem for any other name or model."""
    from service.storage.tables import Model, ModelVersion

    with factory() as session:
        version = session.get(ModelVersion, version_id)
        if version is None:
            raise not_found("model version", version_id)
        model = session.get(Model, version.model_id)
        assert model is not None
        model_id, architecture = model.id, model.architecture
        digests = dict((model.arch_kwargs or {}).get("files") or {})
    if name not in FILE_NAMES or not is_lm(architecture) or name not in digests:
        raise NotFound(
            "not-found",
            f"version {version_id} has no file {name!r}"
            + (
                f"; a {ARCHITECTURE} version has {', '.join(FILE_NAMES)}"
                if is_lm(architecture)
                else f" (only {ARCHITECTURE} models have files beside the checkpoint)"
            ),
            title="Not found",
        )
    key = file_key(model_id, name)
    if not storage.exists(key):
        raise NotFound("not-found", f"the stored {name} is missing", title="Not found")
    return StoredFile(key, str(digests[name]["sha256"]), storage.local_path(key), storage)
