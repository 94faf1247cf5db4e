"""Dataset files: valid npz/JSONL load; every kind of bad file gives an error naming it."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from service.ingest.datasets_io import (
    DatasetError,
    TensorData,
    load_tensor_npz,
    record_hashes,
    record_sha256,
    save_tensor_npz,
    select_rows,
)
from tests.service.conftest import npz_bytes


def _good(n: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "ids": np.array([f"r{i}" for i in range(n)]),
        "inputs": rng.normal(size=(n, 4)).astype(np.float32),
        "labels": np.arange(n) % 3,
    }


def test_load_valid_npz_and_select_rows(digits) -> None:
    x, y = digits
    ids = np.array([f"digit-{i}" for i in range(len(y))])
    data = load_tensor_npz(npz_bytes(ids=ids, inputs=x, labels=y))
    assert len(data) == 1797 and data.inputs.shape == (1797, 64)
    inputs, labels = select_rows(data, ["digit-10", "digit-3"])
    np.testing.assert_array_equal(inputs, x[[10, 3]])
    np.testing.assert_array_equal(labels, y[[10, 3]])
    with pytest.raises(KeyError, match="nope"):
        select_rows(data, ["nope"])


def test_save_load_roundtrip_and_hashes(tmp_path) -> None:
    data = load_tensor_npz(npz_bytes(**_good()))
    path = tmp_path / "d.npz"
    save_tensor_npz(path, data)
    again = load_tensor_npz(path)
    assert record_hashes(again) == record_hashes(data)
    hashes = record_hashes(data)
    assert len(set(hashes)) == 5
    assert record_sha256(data.inputs[0], 0) == hashes[0]
    assert record_sha256(data.inputs[0], 1) != hashes[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ids": np.array(["a", "b", "a", "c", "b"])}, "duplicate ids: 'a', 'b'"),
        ({"ids": np.array([{"x": 1}] * 5, dtype=object)}, "array 'ids': object arrays"),
        ({"inputs": np.array([[1.0, np.nan]] * 5)}, "NaN or infinite"),
        ({"inputs": np.array([[1.0, np.inf]] * 5)}, "NaN or infinite"),
        ({"labels": np.array([0.5] * 5)}, "'labels' must be integers"),
        ({"labels": np.zeros((5, 2), dtype=int)}, "'labels' must be one-dimensional"),
        ({"inputs": np.zeros((4, 3))}, "length mismatch: 5 ids, 4 inputs"),
        ({"inputs": np.array(["a"] * 5)}, "'inputs' must be a numeric array"),
        ({"ids": np.array([1.5] * 5)}, "'ids' must be strings"),
    ],
)
def test_bad_npz(change: dict, message: str) -> None:
    arrays = _good() | change
    with pytest.raises(DatasetError, match=message.replace("(", r"\(")):
        load_tensor_npz(npz_bytes(**arrays))


def test_missing_array_and_garbage() -> None:
    arrays = _good()
    del arrays["labels"]
    with pytest.raises(DatasetError, match="missing arrays: labels"):
        load_tensor_npz(npz_bytes(**arrays))
    with pytest.raises(DatasetError, match="not a readable .npz"):
        load_tensor_npz(b"garbage" * 10)


def test_pickle_is_never_loaded(tmp_path) -> None:
    canary = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    with pytest.raises(DatasetError):
        load_tensor_npz(pickle.dumps(Evil()))
    assert not canary.exists()


def test_tensor_data_len() -> None:
    assert len(TensorData(["a"], np.zeros((1, 2)), np.zeros(1, dtype=int))) == 1
