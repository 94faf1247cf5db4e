"""Storage: atomic writes, hashes, size limits, key validation, both backends."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from service.storage.objects import Storage, StorageError, TooLarge


@pytest.fixture(params=["local", "memory"])
def storage(request: pytest.FixtureRequest, storage_dir: Path) -> Storage:
    if request.param == "local":
        return Storage(str(storage_dir))
    import uuid

    return Storage(f"memory://lethe-test-{uuid.uuid4().hex}")


def test_write_read_roundtrip_and_hash(storage: Storage) -> None:
    data = b"x" * 3_000_001
    sha, size = storage.write_stream("datasets/a.npz", [data[:1000], data[1000:]])
    assert sha == hashlib.sha256(data).hexdigest()
    assert size == len(data) == storage.size("datasets/a.npz")
    with storage.open_read("datasets/a.npz") as fh:
        assert fh.read() == data
    assert storage.exists("datasets/a.npz")
    assert storage.sha256("datasets/a.npz") == sha
    assert list(storage.iter_keys()) == ["datasets/a.npz"]
    assert list(storage.iter_keys("checkpoints/")) == []


def test_too_large_leaves_nothing(storage: Storage) -> None:
    with pytest.raises(TooLarge):
        storage.write_stream("datasets/big.npz", [b"a" * 600, b"b" * 600], max_bytes=1000)
    assert not storage.exists("datasets/big.npz")
    assert list(storage.iter_keys()) == []


def test_overwrite_replaces_and_delete_is_idempotent(storage: Storage) -> None:
    storage.write_bytes("checkpoints/m/1.safetensors", b"old")
    sha, size = storage.write_bytes("checkpoints/m/1.safetensors", b"new content")
    assert (sha, size) == (hashlib.sha256(b"new content").hexdigest(), 11)
    assert storage.open_read("checkpoints/m/1.safetensors").read() == b"new content"
    storage.delete("checkpoints/m/1.safetensors")
    storage.delete("checkpoints/m/1.safetensors")
    assert not storage.exists("checkpoints/m/1.safetensors")
    with pytest.raises(FileNotFoundError):
        storage.open_read("checkpoints/m/1.safetensors")


def test_failed_stream_leaves_nothing(storage: Storage) -> None:
    def chunks():
        yield b"partial"
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        storage.write_stream("datasets/x.npz", chunks())
    assert list(storage.iter_keys()) == []


@pytest.mark.parametrize(
    "key",
    ["../etc/passwd", "/abs/path", "a\\b", "a/../b", "", "a//b", ".tmp/x", "./a", "a/~b", "a b"],
)
def test_unsafe_keys_refused(storage: Storage, key: str) -> None:
    with pytest.raises(StorageError):
        storage.write_bytes(key, b"x")


def test_local_files_stay_under_root(storage_dir: Path) -> None:
    storage = Storage(str(storage_dir))
    storage.write_bytes("datasets/d.npz", b"1")
    path = storage.local_path("datasets/d.npz")
    assert path is not None and path.resolve().is_relative_to(storage_dir.resolve())
    assert not (storage_dir / ".tmp").exists() or not any((storage_dir / ".tmp").iterdir())
