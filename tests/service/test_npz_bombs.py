"""Hostile `.npz` archives: decompression bombs, lying headers, over-limit sizes.

Each is refused with 422 from the archive's headers, before its data is inflated; the
real-server test measures the server process's peak RSS through /proc.
"""

from __future__ import annotations

import io
import threading
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.ingest.datasets_io import DatasetError, load_tensor_npz
from service.ingest.npzread import NpzLimits
from tests.service.conftest import npz_bytes

MIB = 1 << 20


def _npy_header(shape: tuple[int, ...], dtype: str = "<f4", fortran: bool = False) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": dtype, "fortran_order": fortran, "shape": shape}
    )
    return buf.getvalue()  # magic, version and padded header


def write_bomb(target, n_records: int, features: int, *, lie_rows: int | None = None) -> None:
    """An .npz whose `inputs` are zeros streamed through deflate (never held in memory).
    `lie_rows` writes a header declaring that many rows but only `n_records` rows of data."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        small = {
            "ids": np.array([f"r{i}" for i in range(n_records)]),
            "labels": np.zeros(n_records, dtype=np.int64),
        }
        for name, arr in small.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr)
            zf.writestr(name + ".npy", buf.getvalue())
        with zf.open("inputs.npy", "w", force_zip64=True) as fh:
            fh.write(_npy_header((lie_rows or n_records, features)))
            row = bytes(4 * features)
            block = row * max(1, MIB // len(row))
            left = n_records
            per_block = len(block) // len(row)
            while left > 0:
                take = min(left, per_block)
                fh.write(block[: take * len(row)])
                left -= take


def _refused(fn, field: str, words: str) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        fn()
    assert info.value.errors[0]["field"] == field
    assert words in str(info.value)
    return info.value


def test_size_ratio_and_lying_header_refused_before_inflating() -> None:
    bomb = io.BytesIO()
    write_bomb(bomb, 2000, 4096)  # 31 MiB of zeros, about 31 KiB compressed
    assert len(bomb.getvalue()) < MIB
    _refused(
        lambda: load_tensor_npz(bomb.getvalue(), NpzLimits(max_bytes=16 * MIB)),
        "inputs",
        "LETHE_MAX_DATASET_MB",
    )
    _refused(
        lambda: load_tensor_npz(bomb.getvalue(), NpzLimits(max_ratio=100)),
        "inputs",
        "compression ratio",
    )
    # Within generous limits the same archive loads (the checks are not simply "refuse").
    data = load_tensor_npz(bomb.getvalue(), NpzLimits(max_ratio=1e9))
    assert data.inputs.shape == (2000, 4096) and not data.inputs.any()
    # A header declaring 256 GB over a few rows of data: refused, nothing allocated.
    liar = io.BytesIO()
    write_bomb(liar, 4, 16, lie_rows=4_000_000_000)
    _refused(lambda: load_tensor_npz(liar.getvalue()), "inputs", "declares shape")


def test_stored_fortran_and_object_members(digits) -> None:
    x, y = digits
    ids = np.array([f"d{i}" for i in range(50)])
    fortran = np.asfortranarray(x[:50].reshape(50, 8, 8))
    data = load_tensor_npz(npz_bytes(ids=ids, inputs=fortran, labels=y[:50]))
    assert np.array_equal(data.inputs, fortran) and data.ids == list(ids)
    objects = npz_bytes(ids=ids, inputs=np.array([object()] * 50), labels=y[:50])
    _refused(lambda: load_tensor_npz(objects), "inputs", "object arrays")
    # A flipped byte in the data fails the CRC check: refused, not loaded as garbage.
    raw = bytearray(npz_bytes(ids=ids, inputs=x[:50], labels=y[:50]))
    raw[raw.find(b"inputs.npy") + 400] ^= 0xFF
    with pytest.raises(DatasetError):
        load_tensor_npz(bytes(raw))


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_server_memory_stays_bounded_on_an_800_mb_bomb(
    tmp_path: Path, sqlite_url: str, digits
) -> None:
    from service.api.auth import create_key
    from service.storage import migrate
    from service.storage.db import make_engine, make_session_factory, transaction
    from tests.service.conftest import digits_npz
    from tests.service.netfaults import lethe_server, server_env

    migrate.upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    with transaction(make_session_factory(engine)) as s:
        _, secret = create_key(s, scope="admin", name="up")
    engine.dispose()
    bomb = tmp_path / "bomb.npz"
    write_bomb(bomb, 200_000, 1024)  # 800 MB of float32 zeros
    assert bomb.stat().st_size < 1.5 * MIB
    auth = {"Authorization": f"Bearer {secret}"}

    def upload(content: bytes, name: str) -> httpx.Response:
        return httpx.post(
            base + "/v1/datasets",
            headers=auth,
            timeout=120,
            data={"name": name, "kind": "tensor", "role": "train"},
            files={"file": ("d.npz", content, "application/octet-stream")},
        )

    env = server_env(tmp_path, database_url=sqlite_url)
    with lethe_server(env, tmp_path / "server.log") as (base, proc):
        assert upload(digits_npz(digits, 100), "warm").status_code == 201  # lazy imports
        before = _peak_rss(proc.pid)
        content = bomb.read_bytes()
        r = upload(content, "bomb")
        assert r.status_code == 422, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["errors"][0]["field"] == "inputs"
        results: list[int] = []
        threads = [
            threading.Thread(
                target=lambda i=i: results.append(upload(content, f"bomb-{i}").status_code)
            )
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [422] * 4
        growth = _peak_rss(proc.pid) - before
        print(f"server peak RSS growth over 5 bomb uploads: {growth / MIB:.1f} MiB")
        assert growth < 300 * MIB
