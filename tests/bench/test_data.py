"""Benchmark data: idx parsing, the LETHE_FASHION_MNIST folder, and the digits fallback."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from bench import data as bench_data


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _fake_fashion(folder: Path, n_train: int = 50, n_test: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": np.arange(n_train) % 10,
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": np.arange(n_test) % 10,
    }
    for i, (key, stem) in enumerate(bench_data.FASHION_FILES.items()):
        _write_idx(folder / stem, arrays[key], gz=i % 2 == 0)  # mix plain and gzipped
    return arrays


@pytest.fixture
def no_system_fashion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hide any Fashion-MNIST installed on this machine."""
    monkeypatch.delenv("LETHE_FASHION_MNIST", raising=False)
    monkeypatch.setattr(bench_data, "DEBIAN_DEFAULT_DIR", tmp_path / "absent")
    monkeypatch.setattr(bench_data, "_debian_package_dir", lambda: None)


def test_idx_files_from_env_folder_are_parsed_and_subset_by_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_system_fashion: None
) -> None:
    arrays = _fake_fashion(tmp_path)
    monkeypatch.setenv("LETHE_FASHION_MNIST", str(tmp_path))

    d = bench_data.load_bench_data(n_train=30, n_test=None)

    assert d.name == "fashion-mnist" and d.source == str(tmp_path)
    assert tuple(d.x_train.shape) == (30, 1, 28, 28) and tuple(d.x_test.shape) == (20, 1, 28, 28)
    assert d.y_train.bincount(minlength=10).tolist() == [3] * 10  # stratified
    assert d.y_test.tolist() == arrays["test_labels"].tolist()  # full test set, order kept
    # Normalised with the training subset's statistics.
    assert abs(float(d.x_train.mean())) < 1e-4 and abs(float(d.x_train.std()) - 1) < 1e-2


def test_missing_files_fall_back_to_digits_and_say_so(no_system_fashion: None) -> None:
    assert bench_data.find_fashion_mnist() is None
    d = bench_data.load_bench_data(n_train=None, n_test=None)
    assert d.name == "sklearn-digits" and "fallback" in d.source
    assert tuple(d.x_train.shape[1:]) == (1, 8, 8) and d.describe()["n_test"] == 360
    with pytest.raises(FileNotFoundError, match="LETHE_FASHION_MNIST"):
        bench_data.load_bench_data(n_train=None, n_test=None, prefer="fashion-mnist")


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="bad magic"):
        bench_data.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc")
    with pytest.raises(ValueError, match="expected 5 values"):
        bench_data.read_idx(short)
