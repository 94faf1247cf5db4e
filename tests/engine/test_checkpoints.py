"""safetensors checkpoints: round trips, and read_header refusing everything else."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.imu.architectures import build, check_state_dict
from worker.imu.checkpoints import (
    MAX_HEADER_BYTES,
    load_safetensors_into,
    read_header,
    save_safetensors,
    to_bytes,
)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = build("cnn", width=4, batch_norm=True)
    m.train()
    m(torch.randn(8, 1, 8, 8))  # non-trivial BatchNorm buffers
    return m.eval()


def test_round_trip_and_sha256(model, tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    digest = save_safetensors(model, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not list(tmp_path.glob("*.tmp"))
    fresh = build("cnn", width=4, batch_norm=True)
    load_safetensors_into(fresh, path)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    fresh2 = build("cnn", width=4, batch_norm=True)
    load_safetensors_into(fresh2, path.read_bytes())
    assert torch.equal(fresh2.fc.weight, model.fc.weight)


def test_header_feeds_check_state_dict(model, tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    save_safetensors(model, path)
    header = read_header(path)
    assert header["fc.weight"] == ((10, 32), "F32")
    assert header["features.1.num_batches_tracked"] == ((), "I64")
    assert check_state_dict("cnn", {"width": 4, "batch_norm": True}, header).ok
    with open(path, "rb") as fh:
        assert read_header(fh) == header
    assert read_header(path.read_bytes()) == header
    assert not check_state_dict("cnn", {"width": 8, "batch_norm": True}, header).ok


def test_strict_loading_refuses_wrong_keys(model) -> None:
    data = to_bytes(model)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_safetensors_into(build("resnet18_cifar", width=4), data)


def _safetensors_with_header(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("blob", "why"),
    [
        (b"", "shorter than 8 bytes"),
        (b"\x00" * 7, "shorter than 8 bytes"),
        (struct.pack("<Q", 0), "too small"),
        (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "exceeds"),
        (struct.pack("<Q", 50) + b"{}", "file size"),
        (struct.pack("<Q", 4) + b"[12]", "start with"),
        (struct.pack("<Q", 4) + b"{\xff\xfe}", "JSON"),
        (struct.pack("<Q", 4) + b"{,,}", "JSON"),
        (_safetensors_with_header({"a": [1]}), "not an object"),
        (
            _safetensors_with_header(
                {"a": {"dtype": "Q8", "shape": [1], "data_offsets": [0, 1]}}, b"x"
            ),
            "unknown dtype",
        ),
        (
            _safetensors_with_header(
                {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"xxxx"
            ),
            "shape",
        ),
        (
            _safetensors_with_header(
                {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"xxxx"
            ),
            "span",
        ),
        (
            _safetensors_with_header(
                {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"xxxx"
            ),
            "data_offsets",
        ),
        (
            _safetensors_with_header(
                {
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                },
                b"xxxx",
            ),
            "overlap",
        ),
        (
            _safetensors_with_header(
                {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"xxxxyy"
            ),
            "data section",
        ),
        (_safetensors_with_header({"__metadata__": {"k": 1}}), "__metadata__"),
    ],
)
def test_malformed_files_are_refused(blob: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=f"not a safetensors file: .*{why}"):
        read_header(blob)


def test_pickles_and_torch_zip_checkpoints_are_refused(model, tmp_path) -> None:
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_header(pickle.dumps(model.state_dict()))
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    assert zipfile.is_zipfile(path)
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_header(path)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_safetensors_into(model, path)
    with pytest.raises(ValueError, match="not a regular file"):
        read_header(tmp_path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_only_raise_value_error(blob: bytes) -> None:
    try:
        header = read_header(blob)
    except ValueError as exc:
        assert str(exc).startswith("not a safetensors file")
    else:
        assert isinstance(header, dict)


_VALID = None


def _valid_blob() -> bytes:
    global _VALID
    if _VALID is None:
        torch.manual_seed(0)
        _VALID = to_bytes(build("mlp", in_features=4, hidden=[3], num_classes=2))
    return _VALID


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_files(data) -> None:
    blob = bytearray(_valid_blob())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    try:
        header = read_header(bytes(blob))
    except ValueError as exc:
        assert str(exc).startswith("not a safetensors file")
        return
    # Accepted: then safetensors itself must agree on every tensor's shape and dtype.
    from safetensors.torch import load

    tensors = load(bytes(blob))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: s for k, (s, _) in header.items()}


def test_file_objects_are_read_from_their_position(model) -> None:
    buf = io.BytesIO(b"junk" + to_bytes(model))
    buf.seek(4)
    assert "fc.weight" in read_header(buf)
