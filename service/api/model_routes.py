"""/v1/models and /v1/model-versions: registration, listing, checkpoint download."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response, StreamingResponse

from service.api.auth import Principal
from service.api.deps import AppState, get_state, iter_file, only_form_fields, require
from service.api.problems import HTTPProblem
from service.api.schemas import COMMON_ERRORS, LineageOut, ModelOut, Page, VersionOut, problems
from service.domain import lm_registration as lm_domain
from service.domain import models as domain
from service.domain import versions as versions_domain
from service.domain.lm_registration import FORM_FILES as LM_FORM_FILES
from service.domain.pagination import DEFAULT_LIMIT, MAX_LIMIT
from service.domain.views import iso
from service.storage.objects import CHUNK

router = APIRouter(tags=["models"], responses=COMMON_ERRORS)

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
Cursor = Annotated[str | None, Query()]
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


@router.post(
    "/v1/models",
    status_code=201,
    summary="Register a model with its version 1 weights",
    description=(
        "Multipart: `spec` (JSON string `{name, architecture, arch_kwargs, eval_dataset?, "
        "member_probe_dataset?, description?, recipe?}`; `recipe` is a TrainingRecipe, or for "
        "`causal_lm` an LMTrainingRecipe naming the registered base version) and `weights` "
        "(`.safetensors`). The header is "
        "checked against the architecture built on the meta device; a mismatch is 422 listing "
        "missing, unexpected and mis-shaped keys. Anything not safetensors is 422 and is never "
        "unpickled. Returns the model with `active_version` (number 1). Architecture "
        "`causal_lm` (a Hugging Face causal LM) also takes `config` (config.json, `model_type` "
        "on the allowlist, no `auto_map`/remote code), `tokenizer` (tokenizer.json) and "
        "`tokenizer_config` (tokenizer_config.json), with `arch_kwargs` `{}`; the model is "
        "built from config.json on the meta device and compared with the weights (tied "
        "embeddings may be stored once)."
    ),
    dependencies=[Depends(only_form_fields("spec", "weights", *LM_FORM_FILES))],
    response_model=ModelOut,
    responses=problems(400, 409, 413, 507, _409="A model of this name exists"),
)
def register_model(
    spec: Annotated[str, Form(min_length=1, description="Model spec as a JSON string.")],
    weights: Annotated[UploadFile, File(description="A .safetensors checkpoint.")],
    config: Annotated[UploadFile | None, File(description="causal_lm: config.json")] = None,
    tokenizer: Annotated[UploadFile | None, File(description="causal_lm: tokenizer.json")] = None,
    tokenizer_config: Annotated[
        UploadFile | None, File(description="causal_lm: tokenizer_config.json")
    ] = None,
    principal: Principal = Depends(require("admin")),
    state: AppState = Depends(get_state),
) -> dict[str, Any]:
    uploads = {"config": config, "tokenizer": tokenizer, "tokenizer_config": tokenizer_config}
    return domain.register_model(
        state.sessions,
        state.storage,
        spec_json=spec,
        weights=iter_file(weights.file),
        max_bytes=state.settings.max_upload_bytes,
        actor=principal.actor,
        lm_uploads={k: iter_file(v.file) if v else None for k, v in uploads.items()},
    )


@router.get("/v1/models", summary="List models (by name)", response_model=Page[ModelOut])
def list_models(
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
    _: Principal = Depends(require("read")),
    state: AppState = Depends(get_state),
) -> dict[str, Any]:
    return domain.list_models(state.sessions, cursor=cursor, limit=limit)


@router.get(
    "/v1/models/{name}",
    summary="Show a model and its active version",
    response_model=ModelOut,
    responses=problems(404),
)
def show_model(
    name: str, _: Principal = Depends(require("read")), state: AppState = Depends(get_state)
) -> dict[str, Any]:
    return domain.show_model(state.sessions, name)


@router.get(
    "/v1/models/{name}/versions",
    summary="List a model's versions (newest first)",
    response_model=Page[VersionOut],
    responses=problems(404),
)
def list_versions(
    name: str,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
    _: Principal = Depends(require("read")),
    state: AppState = Depends(get_state),
) -> dict[str, Any]:
    return domain.list_versions(state.sessions, name, cursor=cursor, limit=limit)


@router.get(
    "/v1/model-versions/{version_id}",
    summary="One version: lineage, sha256, metrics",
    description="`{id, model, number, parent_id, job_id, status, sha256, size_bytes, metrics, "
    "created_at, lineage, ...}`.",
    response_model=VersionOut,
    responses=problems(404),
)
def show_version(
    version_id: str,
    _: Principal = Depends(require("read")),
    state: AppState = Depends(get_state),
) -> dict[str, Any]:
    return domain.show_version(state.sessions, version_id)


@router.get(
    "/v1/model-versions/{version_id}/lineage",
    summary="The chain from this version back to version 1",
    description=(
        "`{version_id, model, versions: [...]}`, newest first. Each entry is the version "
        "(sha256, status, metrics, `retired_at`, `checkpoint_available`) plus "
        "`deletion_request` (id, status, subject_ref, reason, created_at) of the job that "
        "produced it, `record_key_sha256` (sha256 of each record key the request named, never "
        "the key or its content) and `records_forgotten`."
    ),
    response_model=LineageOut,
    responses=problems(404),
)
def version_lineage(
    version_id: str,
    _: Principal = Depends(require("read")),
    state: AppState = Depends(get_state),
) -> dict[str, Any]:
    return versions_domain.lineage(state.sessions, version_id)


@router.post(
    "/v1/model-versions/{version_id}/promote",
    summary="Release a candidate held by the release policy (admin)",
    description=(
        "candidate → active; the previous active version is superseded (and retired after "
        "LETHE_SUPERSEDED_RETENTION_S), the request's records are forgotten and purged and the "
        "request becomes `completed`. 409 when the version is not a candidate, or when it is "
        "stale (its parent is no longer the active version: later jobs moved the model on)."
    ),
    response_model=VersionOut,
    responses=problems(404, 409, _409="Not a candidate, or stale"),
)
def promote_version(
    version_id: str,
    principal: Principal = Depends(require("admin")),
    state: AppState = Depends(get_state),
) -> dict[str, Any]:
    return versions_domain.promote(
        state.sessions, state.storage, state.settings, version_id, actor=principal.actor
    )


@router.post(
    "/v1/model-versions/{version_id}/reject",
    summary="Reject a candidate (admin)",
    description=(
        "candidate → rejected; its checkpoint is deleted at once, the request becomes "
        "`rejected` and its records stay present (they can be requested again). 409 when the "
        "version is not a candidate."
    ),
    response_model=VersionOut,
    responses=problems(404, 409, _409="Not a candidate"),
)
def reject_version(
    version_id: str,
    principal: Principal = Depends(require("admin")),
    state: AppState = Depends(get_state),
) -> dict[str, Any]:
    return versions_domain.reject(state.sessions, state.storage, version_id, actor=principal.actor)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One `bytes=a-b` range as inclusive (start, end); None means send the whole file: an
    unusable Range is ignored (RFC 9110), not a 400, and several ranges are answered with
    the whole file (also allowed). The one parser for every storage backend."""
    if not header or "," in header:
        return None
    match = _RANGE_RE.match(header.strip())
    if not match or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return None
    else:  # suffix range: the last N bytes
        length = int(last)
        if length == 0:
            raise _unsatisfiable(size)
        start, end = max(size - length, 0), size - 1
    if start >= size:
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> HTTPProblem:
    return HTTPProblem(
        416,
        "range-not-satisfiable",
        f"the checkpoint has {size} bytes",
        title="Range not satisfiable",
        headers={"Content-Range": f"bytes */{size}"},
    )


@router.get(
    "/v1/model-versions/{version_id}/checkpoint",
    summary="Download a version's .safetensors checkpoint",
    description=(
        "Streamed. `ETag` is the quoted sha256 hex, `Repr-Digest: sha-256=:<base64>:`, "
        "`Content-Length`; `Range: bytes=a-b` answers 206 with `Content-Range` (several "
        "ranges: the whole file), honouring `If-Range`. "
        "410 when the checkpoint was retired."
    ),
    response_class=Response,
    responses={
        200: {"description": "The checkpoint", "content": {"application/octet-stream": _BINARY}},
        206: {"description": "Part of it", "content": {"application/octet-stream": _BINARY}},
        304: {"description": "Not modified (If-None-Match)"},
        **problems(404, 410, 416, _410="The checkpoint was retired"),
    },
)
def download_checkpoint(
    version_id: str,
    request: Request,
    _: Principal = Depends(require("read")),
    state: AppState = Depends(get_state),
) -> Response:
    with state.sessions() as session:
        version, model = domain.get_version(session, version_id)
        key, sha, number = version.storage_key, version.sha256, version.number
        status, retired_at = version.status, iso(version.retired_at)
    if key is None or not state.storage.exists(key):
        raise HTTPProblem(
            410,
            "checkpoint-retired",
            f"the checkpoint of version {number} ({status}) was deleted"
            + (f" at {retired_at}" if retired_at else "")
            + "; its metadata and sha256 remain (GET /v1/model-versions/{id})",
            title="Checkpoint no longer available",
            version_id=version_id,
            version_status=status,
            sha256=sha,
            retired_at=retired_at,
        )
    size = state.storage.size(key)
    etag = f'"{sha}"'
    headers = {
        "ETag": etag,
        "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(sha)).decode()}:",
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{model.name}-v{number}.safetensors"',
        "Cache-Control": "private, max-age=31536000, immutable",
    }
    if_none_match = request.headers.get("if-none-match")
    if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if range_header and if_range and if_range.strip() != etag:
        range_header = None  # the client's partial copy is of another representation
    byte_range = parse_range(range_header, size)
    start, end = byte_range if byte_range else (0, size - 1)
    length = end - start + 1 if size else 0
    headers["Content-Length"] = str(length)
    code = 200
    if byte_range is not None:
        code = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"

    def body() -> Iterator[bytes]:
        remaining = length
        with state.storage.open_read(key) as fh:
            fh.seek(start)
            while remaining > 0:
                chunk = fh.read(min(CHUNK, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                yield chunk

    return StreamingResponse(
        body(), status_code=code, headers=headers, media_type="application/octet-stream"
    )


@router.get(
    "/v1/model-versions/{version_id}/files/{name}",
    summary="Download a causal LM version's config.json, tokenizer.json or tokenizer_config.json",
    description=(
        "The JSON files registered with a `causal_lm` model (shared by all its versions; "
        "the weights are at `/checkpoint`). `ETag` is the quoted sha256. 404 for any other "
        "name or a model of another architecture."
    ),
    response_class=Response,
    responses={
        200: {"content": {"application/json": {}}},
        304: {"description": "Not modified (If-None-Match)"},
        **problems(404),
    },
)
def download_model_file(
    version_id: str,
    name: str,
    request: Request,
    _: Principal = Depends(require("read")),
    state: AppState = Depends(get_state),
) -> Response:
    found = lm_domain.model_file(state.sessions, state.storage, version_id, name)
    etag = f'"{found.sha256}"'
    headers = {
        "ETag": etag,
        "Content-Disposition": f'attachment; filename="{name}"',
        "Cache-Control": "private, max-age=31536000, immutable",
    }
    if_none_match = request.headers.get("if-none-match")
    if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    if found.local is not None:
        return FileResponse(found.local, headers=headers, media_type="application/json")
    return Response(found.read(), headers=headers, media_type="application/json")
