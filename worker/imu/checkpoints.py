"""safetensors checkpoints: save, load into a module, and read only the header.

``read_header`` never touches tensor data and never unpickles: it is what the service runs
on an uploaded file before accepting it, so it must reject anything that is not a
well-formed safetensors file with a ``ValueError`` (pickles, zip archives, truncated or
hostile headers), never crash or allocate unbounded memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from worker.imu.architectures import SAFETENSORS_DTYPES

# A header lists each tensor in about 100 bytes: 16 MiB is 100k+ tensors, far above any real
# checkpoint, and bounds what parsing can cost (a 90 MB header took 257 MiB to parse).
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_METADATA_BYTES = 1024 * 1024  # the free-form __metadata__ strings, summed
_DTYPE_BITS = {
    "F64": 64,
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "I64": 64,
    "I32": 32,
    "I16": 16,
    "I8": 8,
    "U64": 64,
    "U32": 32,
    "U16": 16,
    "U8": 8,
    "BOOL": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
}

PathLike = str | os.PathLike[str]
Source = PathLike | bytes | bytearray | memoryview | IO[bytes]


def state_dict_tensors(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies: safetensors refuses tensors that share storage."""
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def to_bytes(
    model: nn.Module | Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> bytes:
    return st_save(state_dict_tensors(model), metadata=metadata)


def save_safetensors(
    model: nn.Module | Mapping[str, torch.Tensor],
    path: PathLike,
    metadata: dict[str, str] | None = None,
) -> str:
    """Write the state dict to ``path`` (atomically: temp file + rename); return its sha256."""
    data = to_bytes(model, metadata)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def load_state_dict(source: PathLike | bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Read all tensors (on CPU) after validating the header."""
    data = (
        bytes(source)
        if isinstance(source, (bytes, bytearray, memoryview))
        else Path(source).read_bytes()
    )
    read_header(data)
    return st_load(data)


def load_safetensors_into(
    model: nn.Module, source: PathLike | bytes | bytearray | memoryview, strict: bool = True
) -> Any:
    """Load a safetensors checkpoint into ``model`` in place; returns load_state_dict's result
    (missing and unexpected keys when ``strict`` is False)."""
    return model.load_state_dict(load_state_dict(source), strict=strict)


def _fail(why: str) -> ValueError:
    return ValueError(f"not a safetensors file: {why}")


def _read_prefix(source: Source) -> tuple[bytes, bytes, int | None]:
    """(first 8 bytes, header bytes, total size if known) from a path, bytes or binary file."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        fh: IO[bytes] = io.BytesIO(bytes(source))
        return _read_from(fh, len(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise _fail(f"{path} is not a regular file")
        with open(path, "rb") as fh:
            return _read_from(fh, path.stat().st_size)
    if hasattr(source, "read"):
        size = None
        try:
            pos = source.tell()
            source.seek(0, os.SEEK_END)
            size = source.tell() - pos
            source.seek(pos)
        except (OSError, AttributeError, ValueError):
            size = None
        return _read_from(source, size)
    raise TypeError(f"expected a path, bytes or a binary file, got {type(source).__name__}")


def _read_from(fh: IO[bytes], size: int | None) -> tuple[bytes, bytes, int | None]:
    prefix = fh.read(8)
    if not isinstance(prefix, bytes) or len(prefix) != 8:
        raise _fail("shorter than 8 bytes")
    n = int.from_bytes(prefix, "little")
    if n < 2:
        raise _fail(f"header length {n} is too small")
    if n > MAX_HEADER_BYTES:
        raise _fail(f"header length {n} exceeds {MAX_HEADER_BYTES} bytes")
    if size is not None and n > size - 8:
        raise _fail(f"header length {n} exceeds the file size {size}")
    header = fh.read(n)
    if len(header) != n:
        raise _fail("truncated header")
    return prefix, header, size


def read_header(source: Source) -> dict[str, tuple[tuple[int, ...], str]]:
    """Parse and validate the JSON header only; return key -> (shape, dtype name).

    Checks: 8-byte little-endian length within bounds, UTF-8 JSON object starting with
    ``{``, every entry with a known dtype, a shape of non-negative integers and
    ``data_offsets`` whose span equals shape x dtype size; the spans tile the data section
    without overlap and (when the size is known) end exactly at the end of the file.
    """
    _, header, size = _read_prefix(source)
    if not header.startswith(b"{"):
        raise _fail("header does not start with '{'")
    try:
        doc = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _fail(f"header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise _fail("header is not a JSON object")

    out: dict[str, tuple[tuple[int, ...], str]] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in doc.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                raise _fail("__metadata__ must map strings to strings")
            chars = sum(len(k) + len(v) for k, v in entry.items())
            if chars > MAX_METADATA_BYTES:
                raise _fail(f"__metadata__ holds {chars} characters; at most {MAX_METADATA_BYTES}")
            continue
        out[key] = _check_entry(key, entry, spans)

    spans.sort()
    end = 0
    for begin, stop, key in spans:
        if begin != end:
            raise _fail(f"tensor {key!r}: data offsets overlap or leave a gap")
        end = stop
    if size is not None and 8 + len(header) + end != size:
        raise _fail(f"data section is {size - 8 - len(header)} bytes, the header describes {end}")
    return out


def _check_entry(
    key: str, entry: Any, spans: list[tuple[int, int, str]]
) -> tuple[tuple[int, ...], str]:
    if not isinstance(entry, dict):
        raise _fail(f"entry {key!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_BITS:
        raise _fail(f"tensor {key!r}: unknown dtype {dtype!r}")
    if dtype not in SAFETENSORS_DTYPES:
        raise _fail(f"tensor {key!r}: dtype {dtype} is not supported by torch here")
    if not isinstance(shape, list) or not all(_is_nonneg_int(s) for s in shape):
        raise _fail(f"tensor {key!r}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_nonneg_int(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _fail(f"tensor {key!r}: bad data_offsets {offsets!r}")
    nbytes = math.prod(shape) * _DTYPE_BITS[dtype] // 8
    if offsets[1] - offsets[0] != nbytes:
        raise _fail(f"tensor {key!r}: data_offsets span does not match shape and dtype")
    spans.append((offsets[0], offsets[1], key))
    return tuple(shape), dtype


def _is_nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
