"""Reading and validating dataset files without ever unpickling anything.

Tensor datasets: `.npz` with `ids` (strings), `inputs` (numeric, finite, first axis = records)
and `labels` (integers). Text datasets: JSONL lines `{"id": ..., "text": ..., "label"?: int}`.
Every validation error names the problem (the array, the line, the duplicate ids).
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from service.ingest.npzread import NpzError, NpzLimits, read_npz
from service.ingest.textcheck import bad_char

MAX_KEY_LENGTH = 500  # Record.key column width
_SHOWN = 10  # how many offending ids an error message lists


class DatasetError(ValueError):
    """The file is not a valid dataset; `errors` lists each problem for the API response."""

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [{"field": "file", "message": message}]


@dataclass
class TensorData:
    ids: list[str]
    inputs: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


Source = str | os.PathLike[str] | BinaryIO | bytes


def _as_fileobj(src: Source) -> Any:
    if isinstance(src, bytes):
        return io.BytesIO(src)
    return src


def _show(values: Iterable[str]) -> str:
    values = list(values)
    text = ", ".join(repr(v) for v in values[:_SHOWN])
    return text + (f" and {len(values) - _SHOWN} more" if len(values) > _SHOWN else "")


def _check_ids(ids: list[str]) -> None:
    if not ids:
        raise DatasetError("the dataset has no records", [{"field": "ids", "message": "empty"}])
    empty = [i for i, key in enumerate(ids) if not key.strip()]
    if empty:
        raise DatasetError(
            f"ids must be non-empty strings; rows {empty[:_SHOWN]} are empty",
            [{"field": "ids", "message": "empty id", "rows": empty[:_SHOWN]}],
        )
    # Record keys go into the database: NUL and lone surrogates cannot be stored there.
    unstorable = [i for i, key in enumerate(ids) if bad_char(key)]
    if unstorable:
        raise DatasetError(
            f"ids contain NUL or lone surrogate characters in rows {unstorable[:_SHOWN]}",
            [{"field": "ids", "message": "unstorable characters", "rows": unstorable[:_SHOWN]}],
        )
    too_long = [key for key in ids if len(key) > MAX_KEY_LENGTH]
    if too_long:
        raise DatasetError(
            f"ids longer than {MAX_KEY_LENGTH} characters: {_show(k[:40] + '…' for k in too_long)}",
            [{"field": "ids", "message": f"longer than {MAX_KEY_LENGTH} characters"}],
        )
    dupes = sorted(key for key, count in Counter(ids).items() if count > 1)
    if dupes:
        raise DatasetError(
            f"duplicate ids: {_show(dupes)}",
            [{"field": "ids", "message": "duplicate ids", "keys": dupes[:100]}],
        )


def _ids_from_array(arr: np.ndarray) -> list[str]:
    if arr.ndim != 1:
        raise DatasetError(
            f"'ids' must be one-dimensional, got shape {arr.shape}",
            [{"field": "ids", "message": f"shape {arr.shape}, expected (n,)"}],
        )
    if arr.dtype.kind == "U":
        return [str(x) for x in arr.tolist()]
    if arr.dtype.kind == "S":
        try:
            return [x.decode("utf-8") for x in arr.tolist()]
        except UnicodeDecodeError:
            raise DatasetError(
                "'ids' bytes are not valid UTF-8", [{"field": "ids", "message": "not UTF-8"}]
            ) from None
    if arr.dtype.kind in "iu":  # integer ids are common; they become their decimal strings
        return [str(int(x)) for x in arr.tolist()]
    raise DatasetError(
        f"'ids' must be strings, got dtype {arr.dtype}",
        [{"field": "ids", "message": f"dtype {arr.dtype}, expected strings"}],
    )


def load_tensor_npz(src: Source, limits: NpzLimits | None = None) -> TensorData:
    """Load and validate an `.npz` tensor dataset: never unpickles, bounded memory."""
    fh = _as_fileobj(src)
    close = isinstance(fh, str | os.PathLike)
    if close:
        fh = open(fh, "rb")  # noqa: SIM115 - closed below
    try:
        start = fh.tell()
        if fh.read(6) == b"\x93NUMPY":
            raise DatasetError("expected an .npz archive (several named arrays), got a single .npy")
        fh.seek(start)
        arrays, members = read_npz(fh, ("ids", "inputs", "labels"), limits or NpzLimits())
    except NpzError as exc:
        raise DatasetError(str(exc), [{"field": exc.field, "message": str(exc)}]) from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        # zipfile: bad archive, CRC mismatch, truncated member; all the uploader's problem.
        raise DatasetError(f"not a readable .npz archive: {exc}") from None
    finally:
        if close:
            fh.close()
    missing = [name for name in ("ids", "inputs", "labels") if name not in arrays]
    if missing:
        raise DatasetError(
            f"missing arrays: {', '.join(missing)} (found: {', '.join(members) or 'none'})",
            [{"field": name, "message": "missing array"} for name in missing],
        )
    ids = _ids_from_array(arrays["ids"])
    inputs, labels = arrays["inputs"], arrays["labels"]
    if inputs.dtype.kind not in "iuf" or inputs.ndim < 1:
        raise DatasetError(
            f"'inputs' must be a numeric array with a record axis, got dtype {inputs.dtype} "
            f"and shape {inputs.shape}",
            [{"field": "inputs", "message": f"dtype {inputs.dtype}, shape {inputs.shape}"}],
        )
    if labels.ndim != 1:
        raise DatasetError(
            f"'labels' must be one-dimensional, got shape {labels.shape}",
            [{"field": "labels", "message": f"shape {labels.shape}, expected (n,)"}],
        )
    if labels.dtype.kind not in "iu":
        raise DatasetError(
            f"'labels' must be integers, got dtype {labels.dtype}",
            [{"field": "labels", "message": f"dtype {labels.dtype}, expected integers"}],
        )
    n = len(ids)
    if inputs.shape[0] != n or labels.shape[0] != n:
        raise DatasetError(
            f"length mismatch: {n} ids, {inputs.shape[0]} inputs, {labels.shape[0]} labels",
            [{"field": "inputs", "message": "first axis must equal the number of ids"}],
        )
    _check_ids(ids)
    if inputs.dtype.kind == "f":
        flat = inputs.reshape(n, -1)
        step = max(1, (16 << 20) // max(1, flat.shape[1] * flat.itemsize))  # bounded temporaries
        bad_rows = np.concatenate(
            [
                np.flatnonzero(~np.isfinite(flat[i : i + step]).all(axis=1)) + i
                for i in range(0, n, step)
            ]
        )
        if bad_rows.size:
            bad_ids = [ids[i] for i in bad_rows[:_SHOWN]]
            raise DatasetError(
                f"'inputs' contain NaN or infinite values in {bad_rows.size} records "
                f"(ids {_show(bad_ids)})",
                [{"field": "inputs", "message": "NaN or infinite values", "keys": bad_ids}],
            )
    if labels.size and labels.min() < 0:
        raise DatasetError(
            "'labels' must be non-negative class indices",
            [{"field": "labels", "message": "negative label"}],
        )
    return TensorData(ids=ids, inputs=inputs, labels=labels.astype(np.int64))


def load_dataset(kind: str, src: Source, limits: NpzLimits | None = None) -> Any:
    """TensorData for `tensor`; a TextCorpus (service.ingest.text_datasets) for `text`."""
    if kind == "tensor":
        return load_tensor_npz(src, limits)
    if kind == "text":
        from service.ingest.text_datasets import load_text_corpus

        if isinstance(src, str | os.PathLike):
            return load_text_corpus(Path(src).read_bytes())
        return load_text_corpus(src)
    raise DatasetError(f"unknown dataset kind {kind!r}", [{"field": "kind", "message": "unknown"}])


def record_sha256(content: np.ndarray | str, label: int | None = None) -> str:
    """Content hash of one record (kept after the content itself is purged)."""
    digest = hashlib.sha256()
    if isinstance(content, str):
        digest.update(b"text\x00")
        digest.update(content.encode("utf-8"))
    else:
        arr = np.ascontiguousarray(content)
        digest.update(f"tensor\x00{arr.dtype.str}\x00{arr.shape}\x00".encode())
        digest.update(arr.tobytes())
    digest.update(b"\x00label\x00" + (b"" if label is None else str(int(label)).encode()))
    return digest.hexdigest()


def record_hashes(data: Any) -> list[str]:
    if hasattr(data, "records"):  # a TextCorpus
        return [r.sha256() for r in data.records]
    return [record_sha256(data.inputs[i], int(data.labels[i])) for i in range(len(data))]


def dataset_meta(data: Any) -> dict[str, Any]:
    if hasattr(data, "records"):  # a TextCorpus
        return dict(data.meta())
    classes = np.unique(data.labels)
    return {
        "input_shape": list(data.inputs.shape[1:]),
        "input_dtype": str(data.inputs.dtype),
        "num_classes": int(classes.max()) + 1 if classes.size else 0,
        "labels": [int(c) for c in classes[:1000]],
    }


def select_rows(data: TensorData, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels of the named records, in the order of `keys`."""
    index = {key: row for row, key in enumerate(data.ids)}
    missing = [key for key in keys if key not in index]
    if missing:
        raise KeyError(f"records not in the dataset: {_show(missing)}")
    rows = np.fromiter((index[key] for key in keys), dtype=np.int64, count=len(keys))
    return data.inputs[rows], data.labels[rows]


def save_tensor_npz(path_or_fileobj: str | Path | BinaryIO, data: TensorData) -> None:
    """Write a tensor dataset in the format `load_tensor_npz` reads (used when purging)."""
    np.savez(
        path_or_fileobj,
        ids=np.array(data.ids, dtype=np.str_),
        inputs=data.inputs,
        labels=data.labels,
    )
