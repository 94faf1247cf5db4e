"""Benchmark data: Fashion-MNIST from local idx files when present, else scikit-learn digits.

Fashion-MNIST is read from Debian's `dataset-fashion-mnist` package files (or any folder with
the four standard idx files, plain or gzipped) — never downloaded, never unpickled. The
folder comes from `LETHE_FASHION_MNIST`, else the Debian install location. When no files are
found the bench falls back to scikit-learn's bundled digits so it still runs on a bare
machine; `BenchData.source` records which data a result was computed on.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# idx type codes (third magic byte) -> numpy big-endian dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass
class BenchData:
    """Normalised tensors (N, C, H, W) float32 and int64 labels, plus where they came from."""

    name: str
    source: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    notes: dict = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "n_train": int(self.x_train.shape[0]),
            "n_test": int(self.x_test.shape[0]),
            "input_shape": list(self.x_train.shape[1:]),
            "classes": self.classes,
            **self.notes,
        }


def read_idx(path: Path) -> np.ndarray:
    """Parse one idx file (optionally gzipped): 2 zero bytes, type code, ndim, big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic)")
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise ValueError(f"{path}: unknown idx type code 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    count = int(np.prod(dims)) if dims else 0
    body = np.frombuffer(raw[header:], dtype=dtype)
    if body.size != count:
        raise ValueError(f"{path}: expected {count} values for shape {dims}, found {body.size}")
    return body.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def _debian_package_dir() -> Path | None:
    """Ask dpkg where the package put its files (works if the install prefix ever moves)."""
    if shutil.which("dpkg") is None:
        return None
    try:
        out = subprocess.run(
            ["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    for line in out.stdout.splitlines():
        if line.strip().endswith(FASHION_FILES["train_images"] + ".gz"):
            return Path(line.strip()).parent
    return None


def _resolve_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def find_fashion_mnist() -> Path | None:
    """The first folder holding all four Fashion-MNIST idx files, or None."""
    candidates: list[Path] = []
    env = os.environ.get("LETHE_FASHION_MNIST")
    if env:
        candidates.append(Path(env))
    candidates.append(DEBIAN_DEFAULT_DIR)
    pkg = _debian_package_dir()
    if pkg is not None:
        candidates.append(pkg)
    for folder in candidates:
        if all(_resolve_file(folder, stem) for stem in FASHION_FILES.values()):
            return folder
    return None


def _subset_indices(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """A fixed, seeded, class-stratified subset (sorted), so every class keeps its share."""
    if n is None or n >= labels.shape[0]:
        return np.arange(labels.shape[0])
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = {int(c): np.flatnonzero(labels == c) for c in classes}
    take: list[np.ndarray] = []
    quota = n // len(classes)
    remainder = n - quota * len(classes)
    for i, c in enumerate(classes):
        idx = per_class[int(c)]
        k = min(idx.size, quota + (1 if i < remainder else 0))
        take.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(take))


def _normalise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # Statistics from the training subset only, one mean/std for the single channel.
    mean, std = float(x_train.mean()), float(x_train.std()) or 1.0
    to_tensor = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))  # noqa: E731
    return to_tensor(x_train), to_tensor(x_test)


def load_fashion_mnist(
    folder: Path, *, n_train: int | None, n_test: int | None, seed: int = 0
) -> BenchData:
    arrays = {key: read_idx(_resolve_file(folder, stem)) for key, stem in FASHION_FILES.items()}
    tr = _subset_indices(arrays["train_labels"], n_train, seed)
    te = _subset_indices(arrays["test_labels"], n_test, seed + 1)
    x_train = arrays["train_images"][tr].astype(np.float32)[:, None] / 255.0
    x_test = arrays["test_images"][te].astype(np.float32)[:, None] / 255.0
    xt, xe = _normalise(x_train, x_test)
    return BenchData(
        name="fashion-mnist",
        source=str(folder),
        x_train=xt,
        y_train=torch.from_numpy(arrays["train_labels"][tr].astype(np.int64)),
        x_test=xe,
        y_test=torch.from_numpy(arrays["test_labels"][te].astype(np.int64)),
        classes=list(FASHION_CLASSES),
        notes={
            "subset": "class-stratified seeded subset" if n_train or n_test else "full",
            "subset_seed": seed,
            "full_sizes": {
                "train": int(arrays["train_labels"].shape[0]),
                "test": int(arrays["test_labels"].shape[0]),
            },
        },
    )


def load_digits_fallback(*, n_train: int | None, n_test: int | None, seed: int = 0) -> BenchData:
    """scikit-learn's 1797 8x8 digits, split 80/20 stratified (sizes capped by what exists)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None] / 16.0
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=seed
    )
    tr = _subset_indices(y_tr, n_train, seed)
    te = _subset_indices(y_te, n_test, seed + 1)
    xt, xe = _normalise(x_tr[tr], x_te[te])
    return BenchData(
        name="sklearn-digits",
        source="sklearn.datasets.load_digits",
        x_train=xt,
        y_train=torch.from_numpy(y_tr[tr]),
        x_test=xe,
        y_test=torch.from_numpy(y_te[te]),
        classes=[str(i) for i in range(10)],
        notes={"subset": "stratified 80/20 split", "subset_seed": seed},
    )


def load_bench_data(
    *, n_train: int | None, n_test: int | None, seed: int = 0, prefer: str = "auto"
) -> BenchData:
    """Fashion-MNIST if its files exist (prefer='auto' or 'fashion-mnist'), else digits."""
    if prefer not in ("auto", "fashion-mnist", "digits"):
        raise ValueError(f"prefer must be auto, fashion-mnist or digits, not {prefer!r}")
    if prefer == "digits":
        return load_digits_fallback(n_train=n_train, n_test=n_test, seed=seed)
    folder = find_fashion_mnist()
    if folder is not None:
        return load_fashion_mnist(folder, n_train=n_train, n_test=n_test, seed=seed)
    if prefer == "fashion-mnist":
        raise FileNotFoundError(
            "Fashion-MNIST idx files not found: set LETHE_FASHION_MNIST or "
            f"`apt-get install {DEBIAN_PACKAGE}`"
        )
    data = load_digits_fallback(n_train=n_train, n_test=n_test, seed=seed)
    data.source += " (fallback: no Fashion-MNIST files found)"
    return data
