"""/v1/datasets: upload (multipart), list, show, page through records."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile

from service.api.auth import Principal
from service.api.deps import AppState, get_state, iter_file, only_form_fields, require
from service.api.schemas import COMMON_ERRORS, DatasetOut, Page, RecordOut, problems
from service.domain import datasets as domain
from service.domain.pagination import DEFAULT_LIMIT, MAX_LIMIT
from service.domain.states import DatasetKind, DatasetRole, RecordState
from service.ingest.npzread import NpzLimits

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=COMMON_ERRORS)

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size.")]
Cursor = Annotated[str | None, Query(description="`next_cursor` of the previous page.")]


@router.post(
    "",
    status_code=201,
    summary="Upload a dataset file",
    description=(
        "Multipart upload. `kind=tensor`: an `.npz` (read with allow_pickle=False) holding "
        "`ids` (unique strings), `inputs` (numeric, finite, first axis = records) and `labels` "
        "(integers). `kind=text`: JSONL, one record per line, `{id, text}` or "
        "`{id, prompt, completion}` (one shape per file, optional integer `label`); a bad "
        "line is 422 naming the line and the field. The file is streamed to "
        "storage while hashed; past LETHE_MAX_UPLOAD_MB the answer is 413. `.npz` members are "
        "checked from their headers before any data is read: inflated sizes over "
        "LETHE_MAX_DATASET_MB or compression ratios over LETHE_MAX_COMPRESSION_RATIO are 422. "
        "Returns "
        "`{id, name, kind, role, record_count, sha256, created_at, ...}`."
    ),
    dependencies=[Depends(only_form_fields("file", "name", "kind", "role"))],
    response_model=DatasetOut,
    responses=problems(400, 413, 507, _413="Upload too large"),
)
def upload_dataset(
    file: Annotated[UploadFile, File(description="The .npz or .jsonl file.")],
    name: Annotated[str, Form(min_length=1, max_length=200)],
    kind: Annotated[DatasetKind, Form()],
    role: Annotated[DatasetRole, Form()],
    principal: Principal = Depends(require("admin")),
    state: AppState = Depends(get_state),
) -> dict[str, Any]:
    return domain.register_dataset(
        state.sessions,
        state.storage,
        name=name,
        kind=kind,
        role=role,
        chunks=iter_file(file.file),
        max_bytes=state.settings.max_upload_bytes,
        actor=principal.actor,
        limits=NpzLimits.from_settings(state.settings),
    )


@router.get("", summary="List datasets (newest first)", response_model=Page[DatasetOut])
def list_datasets(
    role: Annotated[DatasetRole | None, Query()] = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
    _: Principal = Depends(require("read")),
    state: AppState = Depends(get_state),
) -> dict[str, Any]:
    return domain.list_datasets(state.sessions, role=role, cursor=cursor, limit=limit)


@router.get(
    "/{dataset_id}",
    summary="Show a dataset, with counts of present/forgotten records",
    response_model=DatasetOut,
    responses=problems(404),
)
def show_dataset(
    dataset_id: str,
    _: Principal = Depends(require("read")),
    state: AppState = Depends(get_state),
) -> dict[str, Any]:
    return domain.show_dataset(state.sessions, dataset_id)


@router.get(
    "/{dataset_id}/records",
    summary="Page through record keys and states",
    description="Items: `{key, row, state, sha256, forgotten_at, purged_at}` in the order of "
    "the file as uploaded (`row`); a forgotten record's content is purged from the file, its "
    "key and sha256 remain.",
    response_model=Page[RecordOut],
    responses=problems(404),
)
def list_records(
    dataset_id: str,
    state_filter: Annotated[RecordState | None, Query(alias="state")] = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
    _: Principal = Depends(require("read")),
    state: AppState = Depends(get_state),
) -> dict[str, Any]:
    return domain.list_records(
        state.sessions, dataset_id, state=state_filter, cursor=cursor, limit=limit
    )
