"""Writes a small CIFAR-10 directory in the real python format (pickled batches)."""

import hashlib
import pickle
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 30, seed: int = 0):
    """Five train batches and a test batch; returns the (train_list, test_list, meta) md5 tables."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(name, n):
        labels = [int(i % 10) for i in range(n)]
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data, "filenames": [f"{i}.png" for i in range(n)]}, f)
        return [name, _md5(folder / name)]

    train_list = [batch(f"data_batch_{i}", per_batch) for i in range(1, 6)]
    test_list = [batch("test_batch", n_test)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    meta = {"filename": "batches.meta", "key": "label_names", "md5": _md5(folder / "batches.meta")}
    return train_list, test_list, meta


def use_generated_cifar10(monkeypatch, root: Path, **kwargs):
    """Write the files; torchvision's md5 table is left as it is (featcache reads a directory as it is)."""
    write_cifar10(root, **kwargs)
    return root
