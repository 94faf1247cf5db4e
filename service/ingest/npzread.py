"""Read `.npz` members with bounded memory, validating each from its headers first.

`np.load` trusts an archive: a member that deflates 1 MB into 800 MB is inflated whole (with
copies), and a `.npy` header declaring a 256 GB shape is allocated before anything is read.
Here the zip entry's declared sizes and the `.npy` header are checked before any data is
read: sizes over the limit, absurd compression ratios and headers that disagree with the
entry's size are refused. The data then streams, in fixed chunks, straight into the final
array. zipfile stops at the declared size and checks the CRC, so a lying entry cannot
inflate past what was checked.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

_CHUNK = 1 << 20
# Small members may compress absurdly well (a column of zeros) and cost nothing; the ratio
# limit applies from this inflated size on.
_RATIO_FLOOR_BYTES = 4 << 20


@dataclass(frozen=True)
class NpzLimits:
    max_bytes: int = 1024 << 20  # all named members together, inflated
    max_ratio: float = 200.0

    @classmethod
    def from_settings(cls, settings: Any) -> NpzLimits:
        return cls(settings.max_dataset_mb << 20, float(settings.max_compression_ratio))


class NpzError(ValueError):
    """The archive or one member is refused; `field` names the member."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _check_entries(
    zf: zipfile.ZipFile, names: tuple[str, ...], limits: NpzLimits
) -> dict[str, zipfile.ZipInfo]:
    entries = {}
    total = 0
    for name in names:
        try:
            info = zf.getinfo(name + ".npy")
        except KeyError:
            continue
        if info.flag_bits & 0x1:
            raise NpzError(name, f"array '{name}' is encrypted")
        total += info.file_size
        if total > limits.max_bytes:
            raise NpzError(
                name,
                f"the arrays inflate to more than {_mib(limits.max_bytes)} (LETHE_MAX_DATASET_MB)",
            )
        if info.file_size > _RATIO_FLOOR_BYTES:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > limits.max_ratio:
                raise NpzError(
                    name,
                    f"array '{name}' claims a compression ratio of {ratio:.0f}:1 "
                    f"(limit {limits.max_ratio:.0f}:1, LETHE_MAX_COMPRESSION_RATIO)",
                )
        entries[name] = info
    return entries


def _read_member(zf: zipfile.ZipFile, name: str, info: zipfile.ZipInfo) -> np.ndarray:
    with zf.open(info) as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        except ValueError as exc:
            raise NpzError(name, f"array '{name}' has an invalid .npy header: {exc}") from None
        if dtype.hasobject:
            raise NpzError(name, f"array '{name}': object arrays are not allowed")
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        header = fh.tell()
        if header + nbytes != info.file_size:
            raise NpzError(
                name,
                f"array '{name}' declares shape {shape} ({_mib(nbytes)}) but the archive "
                f"entry holds {_mib(info.file_size - header)}",
            )
        flat = np.empty(count, dtype=dtype)
        # The byte view of the final array: chunks land in place, never a second copy.
        view = memoryview(flat.view(np.uint8).data) if count else memoryview(b"")
        pos = 0
        while pos < nbytes:
            chunk = fh.read(min(_CHUNK, nbytes - pos))
            if not chunk:
                raise NpzError(name, f"array '{name}' is truncated")
            view[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        fh.read(1)  # reaching the end makes zipfile check the CRC
    if fortran:
        return flat.reshape(shape[::-1]).transpose()
    return flat.reshape(shape)


def read_npz(
    fileobj: Any, names: tuple[str, ...], limits: NpzLimits
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The named arrays (absent ones left out) and the archive's member names."""
    with zipfile.ZipFile(fileobj) as zf:
        members = [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]
        entries = _check_entries(zf, names, limits)
        return {name: _read_member(zf, name, info) for name, info in entries.items()}, members
