"""The S3 storage path (service.storage.objects._S3Backend) against a real S3 server: moto's
(`moto_server`, the dev extra) as a subprocess on a free port, reached over HTTP by s3fs
exactly as a deployment with `LETHE_STORAGE_URL=s3://…` and `AWS_ENDPOINT_URL_S3` would."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.storage.objects import Storage, StorageError, TooLarge, _S3Backend

pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")

MIB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which(
        "moto_server"
    )
    if exe is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]', the dev extra)")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start: {log.read_text()}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Storage, Any, str]]:
    """A fresh bucket; the Storage and a raw s3fs filesystem to look at it from outside."""
    import s3fs

    for name, value in {
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # instances are cached per arguments, not env
    bucket = f"lethe-{uuid.uuid4().hex[:12]}"
    raw = s3fs.S3FileSystem(use_listings_cache=False)
    raw.mkdir(bucket)
    yield Storage(f"s3://{bucket}/prefix"), raw, bucket
    s3fs.S3FileSystem.clear_instance_cache()


def _all_objects(raw: Any, bucket: str) -> list[str]:
    raw.invalidate_cache()
    return sorted(raw.find(bucket))


def test_put_get_delete_and_listing(s3: tuple[Storage, Any, str]) -> None:
    storage, raw, bucket = s3
    payload = os.urandom(300_000)
    sha, size = storage.write_stream("datasets/a.npz", [payload[:1000], payload[1000:]])
    storage.write_bytes("checkpoints/m1/v1.safetensors", b"weights-1")
    storage.write_bytes("checkpoints/m1/v2.safetensors", b"weights-2")
    assert size == len(payload)
    assert sha == storage.sha256("datasets/a.npz")
    with storage.open_read("datasets/a.npz") as fh:
        assert fh.read() == payload
    assert storage.exists("datasets/a.npz") and storage.size("datasets/a.npz") == len(payload)
    # Exactly the three objects under the prefix: no temporary key was ever created.
    assert _all_objects(raw, bucket) == [
        f"{bucket}/prefix/checkpoints/m1/v1.safetensors",
        f"{bucket}/prefix/checkpoints/m1/v2.safetensors",
        f"{bucket}/prefix/datasets/a.npz",
    ]
    assert list(storage.iter_keys("checkpoints/")) == [
        "checkpoints/m1/v1.safetensors",
        "checkpoints/m1/v2.safetensors",
    ]
    # Small objects are one PUT: a plain MD5 ETag (a multipart upload's ends in -<parts>).
    assert "-" not in raw.info(f"{bucket}/prefix/datasets/a.npz")["ETag"]

    storage.write_bytes("checkpoints/m1/v1.safetensors", b"replaced")  # overwrite in place
    with storage.open_read("checkpoints/m1/v1.safetensors") as fh:
        assert fh.read() == b"replaced"
    storage.delete("checkpoints/m1/v1.safetensors")
    storage.delete("checkpoints/m1/v1.safetensors")  # idempotent
    assert not storage.exists("checkpoints/m1/v1.safetensors")
    with pytest.raises(FileNotFoundError):
        storage.open_read("checkpoints/m1/v1.safetensors")
    assert list(storage.iter_keys()) == ["checkpoints/m1/v2.safetensors", "datasets/a.npz"]
    with pytest.raises(StorageError):
        storage.write_bytes("../escape", b"x")


def test_ranged_reads(s3: tuple[Storage, Any, str]) -> None:
    storage, _, _ = s3
    data = bytes(range(256)) * 4096  # 1 MiB with a recognisable pattern
    storage.write_bytes("checkpoints/m/r.safetensors", data)
    with storage.open_read("checkpoints/m/r.safetensors") as fh:
        fh.seek(1000)
        assert fh.read(10) == data[1000:1010]
        fh.seek(len(data) - 5)
        assert fh.read() == data[-5:]
        fh.seek(123_456)
        assert fh.read(70_000) == data[123_456:193_456]


def test_large_object_is_one_multipart_upload(
    s3: tuple[Storage, Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, raw, bucket = s3
    monkeypatch.setattr(_S3Backend, "PART_BYTES", 5 * MIB)  # S3's smallest part size
    chunk = os.urandom(MIB)
    sha, size = storage.write_stream("datasets/big.npz", (chunk for _ in range(11)))
    assert size == 11 * MIB
    info = raw.info(f"{bucket}/prefix/datasets/big.npz")
    assert info["ETag"].strip('"').endswith("-3")  # three parts: 5 + 5 + 1 MiB
    assert storage.sha256("datasets/big.npz") == sha
    assert _all_objects(raw, bucket) == [f"{bucket}/prefix/datasets/big.npz"]


def test_failed_uploads_leave_nothing(
    s3: tuple[Storage, Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, raw, bucket = s3
    monkeypatch.setattr(_S3Backend, "PART_BYTES", 5 * MIB)
    storage.write_bytes("datasets/keep.npz", b"old content")

    # Over the limit after two parts were uploaded: the multipart upload is aborted.
    with pytest.raises(TooLarge):
        storage.write_stream("datasets/keep.npz", (b"x" * MIB for _ in range(12)), 11 * MIB)

    def broken() -> Iterator[bytes]:
        yield b"partial"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):  # a small object: its single PUT is never sent
        storage.write_stream("datasets/new.npz", broken())
    assert _all_objects(raw, bucket) == [f"{bucket}/prefix/datasets/keep.npz"]
    with storage.open_read("datasets/keep.npz") as fh:
        assert fh.read() == b"old content"
    # No multipart upload was left open (its parts would be billed forever).
    assert raw.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
