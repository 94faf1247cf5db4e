"""Parsed dataset files kept between jobs of one process (the loading phase reads the eval
and member sets of every job of a model).

Keyed by storage key and content sha256, so a file rewritten by a purge is never served
stale. After a release the purge rewrites the training file without the forgotten rows: the
cached copy is carried over to the new file by dropping those rows (`carry_over`) instead of
re-reading and re-parsing it (63 MB for 20k Fashion-MNIST records), and the old copy goes:
forgotten rows must not outlive their file in memory either.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection

import numpy as np

from service.ingest.datasets_io import TensorData


class DatasetCache:
    """Parsed dataset files kept between jobs of one process; bounded in entries and bytes."""

    def __init__(self, max_entries: int = 4, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[tuple[str, str], TensorData] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> TensorData | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple[str, str], data: TensorData) -> None:
        if _nbytes(data) > self.max_bytes:
            return
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.max_entries or self._total() > self.max_bytes:
                self._items.popitem(last=False)

    def evict_other_files(self, storage_key: str) -> None:
        """Drop cached copies of earlier files of the same dataset (a purge rewrote it): the
        forgotten rows must not outlive their file in memory either."""
        prefix = _dataset_prefix(storage_key)
        with self._lock:
            for key in [
                k for k in self._items if k[0] != storage_key and _dataset_prefix(k[0]) == prefix
            ]:
                del self._items[key]

    def carry_over(
        self, old_key: str, new_key: str, new_sha256: str, dropped: Collection[str], removed: int
    ) -> bool:
        """Cache the purged file's content from the old file's copy, without ``dropped``
        (the rows the purge removed, ``removed`` of them); False (and the old copy evicted)
        if there was no copy or it does not add up."""
        with self._lock:
            olds = [k for k in self._items if k[0] == old_key]
            data = self._items.get(olds[0]) if olds else None
            for k in olds:
                del self._items[k]
        if data is None:
            return False
        keep = np.fromiter((i not in dropped for i in data.ids), dtype=bool, count=len(data.ids))
        if int((~keep).sum()) != removed:
            return False
        ids = [i for i, k in zip(data.ids, keep, strict=True) if k]
        self.put((new_key, new_sha256), TensorData(ids, data.inputs[keep], data.labels[keep]))
        return True

    def _total(self) -> int:
        return sum(_nbytes(d) for d in self._items.values())


def _nbytes(data: TensorData) -> int:
    return int(getattr(data.inputs, "nbytes", 0))


def _dataset_prefix(storage_key: str) -> str:
    # datasets/<36-char dataset id>[-<rewrite>].<ext>
    name = storage_key.rsplit("/", 1)[-1]
    return name[:36]


DATASETS = DatasetCache()
