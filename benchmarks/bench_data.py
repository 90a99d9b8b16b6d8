"""Benchmark data: scikit-learn's digits, tiled K times so a GPU run lasts long enough to time.

``digits`` gives 1,437 training images; a GPU extracts that in well under a second, so the
fixed costs would be all one measures. ``tiled_digits(k)`` registers a dataset
``digits-xK`` whose every split is digits' split repeated K times, each copy shifted by a
different pixel offset (np.roll) so no two rows are byte-identical. Both sides of every
comparison read the same rows.
"""

from __future__ import annotations

from pathlib import Path

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


def stripes(root: Path, n: int, classes: int = 10, size: int = 48, seed: int = 0, noise: float = 40.0,
            first: int = 0) -> Path:
    """``n`` photos in ``classes`` class folders: stripes at 180/classes degrees apart, random phase and
    period, ``noise`` (the pixels' standard deviation) added; a CNN's taps tell them apart unevenly.
    ``first``: the first file's number (a second split in another folder draws other images)."""
    from PIL import Image

    rng = np.random.default_rng(seed if not first else [seed, first])  # first 0: the images choose.py recorded
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(first, first + n):
        k = i % classes
        angle = np.pi * k / classes + rng.normal(0, 0.08)
        period = rng.uniform(5, 9)
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period + rng.uniform(0, 2 * np.pi))
        pixels = 128 + 60 * wave[..., None] + rng.normal(0, noise, (size, size, 3))
        folder = root / f"class{k}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root
