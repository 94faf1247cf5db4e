"""The loader follows a dataset whose file a purge replaced while the job was being read."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest

from service.storage.tables import Dataset
from tests.worker.harness import Stack
from worker.context import RunnerContext
from worker.errors import JobError
from worker.loading import DataSource, Loader


def _npz(n: int) -> bytes:
    buf = io.BytesIO()
    np.savez(
        buf,
        ids=np.array([f"k{i}" for i in range(n)]),
        inputs=np.zeros((n, 4), np.float32),
        labels=np.zeros(n, np.int64),
    )
    return buf.getvalue()


def test_a_stale_file_key_is_followed_to_the_dataset_s_current_file(sqlite_stack: Stack) -> None:
    dataset_id = sqlite_stack.upload("d", "train", _npz(5))
    with sqlite_stack.sessions() as session:
        dataset = session.get(Dataset, dataset_id)
        assert dataset is not None
        current = DataSource.of(dataset)
    ctx = RunnerContext.from_settings(sqlite_stack.settings, worker_id="test:1:x")
    loader = Loader(ctx, "job", lambda _phase, _fraction: None)
    # What a job read before a purge replaced the file: a key that is gone from storage.
    stale = dataclasses.replace(current, storage_key="datasets/replaced-by-a-purge.npz")
    source, raw = loader.read_dataset(stale)
    assert source.storage_key == current.storage_key
    assert isinstance(raw, bytes) and raw == ctx.storage.open_read(current.storage_key).read()
    assert [str(k) for k in loader.dataset(stale).ids] == [f"k{i}" for i in range(5)]
    # When the dataset itself still points at the missing file, the error says so.
    ctx.storage.delete(current.storage_key)
    with pytest.raises(JobError, match="dataset"):
        loader.read_dataset(current)
