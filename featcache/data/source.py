"""What every dataset source hands the extraction: class names and per-split labels with images or files.

Stage 1 (**data** -> backbones -> extraction). A source is one :class:`DatasetEntry` of ``DATASETS``: a cheap
``identity`` (for the cache fingerprint, never loading pixels), a ``key`` (the cache sub-folder) and a ``load``
giving a :class:`Dataset`. The sources live beside this module (``datasets`` for digits and folders,
``torchvision_sets``, ``hub``, ``manifest``, ``shards``); ``datasets`` gathers them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError
from featcache.registry import Registry

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Split:
    """One split: labels, source positions, and either in-memory images or files."""

    labels: np.ndarray  # int64 (N,)
    index: np.ndarray  # int64 (N,), position in the source dataset
    images: np.ndarray | None = None  # uint8 (N, H, W, 3)
    files: tuple | None = None  # paths, or data.images.Blob entries (a lazy sequence may stand for the tuple)
    official_val: np.ndarray | None = None  # bool (N,): train rows that are the dataset's own validation split

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> Split:
        files = self.files
        if files is not None:
            files = files.take(rows) if hasattr(files, "take") else tuple(files[i] for i in rows)
        return Split(
            labels=self.labels[rows],
            index=self.index[rows],
            images=None if self.images is None else self.images[rows],
            files=files,
            official_val=None if self.official_val is None else self.official_val[rows],
        )


@dataclass(frozen=True)
class Dataset:
    key: str  # cache sub-folder, e.g. "cifar10" or "folder-footwear"
    classes: tuple[str, ...]
    splits: dict[str, Split]
    about: dict = field(default_factory=dict)  # for the report: source, where validation comes from
    notes: tuple[str, ...] = ()  # what loading left out or found (a gap in the labels, duplicates): said as warnings

    @property
    def validation(self) -> str:
        """Where the validation rows come from, in words."""
        val = self.splits["train"].official_val
        if val is not None and val.any():
            return f"the dataset's own validation split ({int(val.sum())} images)"
        return "carved from train (stratified, seeded)"


@dataclass(frozen=True)
class DataRequest:
    """What to load: the dataset flags of ``extract`` (and later of ``fuse-train``)."""

    name: str = "digits"
    data_dir: Path | None = None
    download: bool = False
    limit_train: int | None = None
    limit_test: int | None = None
    test_fraction: float = 0.2
    seed: int = 0
    hf_name: str | None = None
    hf_config: str | None = None
    hf_splits: str | None = None
    image_column: str | None = None
    label_column: str | None = None

    def __post_init__(self):
        for flag, value in (("--limit-train", self.limit_train), ("--limit-test", self.limit_test)):
            if value is not None and value < 1:
                raise FeatcacheError(f"{flag} must be a positive number of images. Got {value} instead.")
        if not 0 < self.test_fraction < 1:
            raise FeatcacheError(f"--test-fraction must lie between 0 and 1. Got {self.test_fraction} instead.")

    def common_identity(self) -> dict:
        return {"limit_train": self.limit_train, "limit_test": self.limit_test, "seed": self.seed}

    def source_fields(self) -> dict:
        """The source options set away from their defaults (hf_name, columns ...), as a record holds them."""
        return {name: getattr(self, name) for name in SOURCE_FIELDS if getattr(self, name) is not None}


SOURCE_FIELDS = ("hf_name", "hf_config", "hf_splits", "image_column", "label_column")


@dataclass(frozen=True)
class DatasetEntry:
    key: callable  # (request) -> cache sub-folder name
    identity: callable  # (request) -> dict, cheap
    load: callable  # (request) -> Dataset before limits
    about: str = ""  # one line for featcache datasets
    describe: callable = None  # (name) -> lines for featcache datasets NAME: splits, classes, label type


DATASETS = Registry("--dataset")


def limit(split: Split, n: int | None, seed: int) -> Split:
    """A stratified subset of ``n`` rows kept in source order (all rows if n >= N)."""
    if n is None or n >= len(split):
        return split
    rows = stratified_pick(split.labels, n, seed)
    return split.take(np.sort(rows))


def stratified_pick(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(labels))
    counts = np.bincount(labels)
    # Stratification needs every class at least twice and room for every class.
    can_stratify = counts[counts > 0].min() >= 2 and len(counts[counts > 0]) <= n <= len(labels) - len(counts[counts > 0])
    picked, _ = train_test_split(
        positions, train_size=n, random_state=seed, stratify=labels if can_stratify else None
    )
    return picked


def split_train_test(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test positions, each kept in source order."""
    n_test = max(1, int(round(test_fraction * len(labels))))
    if n_test >= len(labels):
        raise FeatcacheError(f"a dataset of {len(labels)} images is too small to split off a test set")
    test = np.sort(stratified_pick(labels, n_test, seed))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def rgb_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) arrays of any range -> uint8 (N, H, W, 3)."""
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    return np.ascontiguousarray(images.astype(np.uint8))


def files_identity(root: Path, only=None) -> str:
    """A hash of every file under ``root`` (or of the paths ``only`` below it) with its size and modification
    time: a changed, added or removed file changes it, and nothing is read."""
    from featcache.data.images import files_under

    digest = hashlib.sha256()
    for parts, entry in files_under(root):
        if only is None or "/".join(parts).split("/")[0] in only:
            stat = entry.stat()
            digest.update(json.dumps(["/".join(parts), stat.st_size, stat.st_mtime_ns]).encode())
    return digest.hexdigest()


def stat_identity(paths) -> str:
    """The same for a list of files (manifest rows, shards): name, size and modification time of each."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(json.dumps([str(path), stat.st_size, stat.st_mtime_ns]).encode())
        except OSError:
            digest.update(json.dumps([str(path), None]).encode())  # missing: counted as bad when read
    return digest.hexdigest()


def official_splits(parts: dict[str, Split], request: DataRequest) -> dict[str, Split]:
    """train / test from a source's own splits ``{"train"[, "val"][, "test"]: Split}``: an official validation
    split joins train, marked (so none is carved from train); a missing test split is carved from train with
    ``--test-fraction`` (stratified, seeded)."""
    for name, part in parts.items():
        if len(part) == 0:
            raise FeatcacheError(f"the {name} split holds no images: check --data-dir")
    parts = dict(parts)
    if "test" not in parts:
        train, test = split_train_test(parts["train"].labels, request.test_fraction, request.seed)
        parts["test"] = parts["train"].take(test)
        parts["train"] = parts["train"].take(train)
    if "val" in parts:
        parts["train"] = join(parts["train"], parts.pop("val"))
    return {"train": parts["train"], "test": parts["test"]}


def join(train: Split, val: Split) -> Split:
    """Train followed by the official validation rows, marked as such."""
    def both(a, b):
        return None if a is None else np.concatenate([a, b])

    files = None
    if train.files is not None:
        both_lazy = isinstance(train.files, Rows) and isinstance(val.files, Rows)
        files = train.files.join(val.files) if both_lazy else tuple(train.files) + tuple(val.files)
    after = int(train.index.max()) + 1 if len(train.index) else 0  # one index per row: validation's come after
    return Split(labels=both(train.labels, val.labels), index=both(train.index, val.index + after),
                 images=both(train.images, val.images), files=files,
                 official_val=np.concatenate([np.zeros(len(train), bool), np.ones(len(val), bool)]))


class Rows:
    """A lazy sequence of images held by readers (an Arrow table, a torchvision dataset, tar shards): it
    stands for ``Split.files`` without an object per image. Each part is ``(reader, positions)``; a reader
    is picklable (DataLoader workers get it) and gives ``reader.blob(position)``, a
    :class:`~featcache.data.images.Blob`."""

    def __init__(self, parts):
        self.parts = tuple((reader, np.asarray(positions, dtype=np.int64)) for reader, positions in parts)
        self._ends = np.cumsum([len(p) for _, p in self.parts])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _locate(self, rows: np.ndarray):
        rows = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(self._ends, rows, side="right")
        starts = np.concatenate([[0], self._ends[:-1]]).astype(np.int64)
        return which, rows - starts[which] if len(rows) else rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        (part,), (offset,) = self._locate(np.array([i]))
        reader, positions = self.parts[part]
        return reader.blob(int(positions[offset]))

    def __iter__(self):
        for reader, positions in self.parts:
            for position in positions:
                yield reader.blob(int(position))

    def take(self, rows) -> Rows:
        """The rows ``rows``, in that order (runs of one reader stay one part)."""
        which, offsets = self._locate(rows)
        parts, start = [], 0
        for k in range(1, len(which) + 1):
            if k == len(which) or which[k] != which[start]:
                reader, positions = self.parts[which[start]]
                parts.append((reader, positions[offsets[start:k]]))
                start = k
        return Rows(parts)

    def join(self, other) -> Rows:
        return Rows(self.parts + other.parts)
