"""Benchmark data: scikit-learn's digits, tiled K times so a GPU run lasts long enough to time.

``digits`` gives 1,437 training images; a GPU extracts that in well under a second, so the
fixed costs would be all one measures. ``tiled_digits(k)`` registers a dataset
``digits-xK`` whose every split is digits' split repeated K times, each copy shifted by a
different pixel offset (np.roll) so no two rows are byte-identical. Both sides of every
comparison read the same rows.
"""

from __future__ import annotations

import numpy as np

from featcache.data.datasets import DATASETS, DataRequest, Dataset, DatasetEntry, Split


def tiled_digits(k: int, **request) -> DataRequest:
    """A DataRequest for digits tiled ``k`` times (``k == 1``: plain digits)."""
    if k == 1:
        return DataRequest(name="digits", **request)
    name = f"digits-x{k}"
    base = DATASETS.lookup("digits")

    def load(req: DataRequest) -> Dataset:
        data = base.load(DataRequest(name="digits", test_fraction=req.test_fraction, seed=req.seed))
        splits = {}
        for split_name, split in data.splits.items():
            images = np.concatenate([np.roll(split.images, shift=(i % 3 - 1, i // 3 % 3 - 1), axis=(1, 2))
                                     for i in range(k)])
            n = len(split)
            splits[split_name] = Split(labels=np.tile(split.labels, k), index=np.arange(n * k, dtype=np.int64),
                                       images=images)
        return Dataset(name, data.classes, splits)

    DATASETS.register(name)(DatasetEntry(key=lambda r: name,
                                         identity=lambda r: {**base.identity(r), "tiled": k}, load=load))
    return DataRequest(name=name, **request)
