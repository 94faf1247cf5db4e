"""The README walkthrough's files: `python -m service.devtools.sample_data [DIR]`.

Writes into DIR (default: the current directory) scikit-learn's digits as `.npz` files with
string ids — `digits.npz` (1400 training records `d0` … `d1399`) and `digits-eval.npz` (the
397 held out, for evaluation) — and `mlp.safetensors`, an MLP (64 → 64 → 10) trained on the
first set. The same steps are spelled out in the README's curl walkthrough.
"""

from __future__ import annotations

import sys
from pathlib import Path

TRAIN = 1400


def write_sample_data(directory: Path) -> list[Path]:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    from service import engine

    directory.mkdir(parents=True, exist_ok=True)
    d = load_digits()
    # Shuffled: digits is ordered by writer, and an eval set of other writers makes every
    # training record look remembered to the membership test.
    order = np.random.default_rng(0).permutation(len(d.target))
    x, y = (d.data[order] / 16).astype("float32"), d.target[order].astype("int64")
    ids = np.array([f"d{i}" for i in range(len(y))])
    paths = [directory / "digits.npz", directory / "digits-eval.npz", directory / "mlp.safetensors"]
    np.savez(paths[0], ids=ids[:TRAIN], inputs=x[:TRAIN], labels=y[:TRAIN])
    np.savez(paths[1], ids=ids[TRAIN:], inputs=x[TRAIN:], labels=y[TRAIN:])
    torch.manual_seed(0)
    model = engine.build_model("mlp", in_features=64, hidden=[64], num_classes=10)
    engine.fit(model, torch.from_numpy(x[:TRAIN]), torch.from_numpy(y[:TRAIN]), epochs=30, lr=3e-3)
    engine.save_safetensors(model, paths[2])
    return paths


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    for path in write_sample_data(Path(args[0]) if args else Path.cwd()):
        print(path)


if __name__ == "__main__":
    main()
