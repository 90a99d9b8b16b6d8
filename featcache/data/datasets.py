"""Dataset registry: cifar10, folder and digits -> class names and per-split images + labels.

Stage 1 (**data** -> backbones -> extraction). Each entry gives a
cheap ``identity`` (for the cache fingerprint, never loading pixels) and a ``load`` that
returns a :class:`Dataset`. Small images stay in memory as uint8 ``(N, H, W, 3)`` so the
extractor can ship whole batches to the device; photo folders are lists of files that
DataLoader workers decode.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.data.images import IMAGE_SUFFIXES, files_under, images_in
from featcache.errors import FeatcacheError
from featcache.registry import Registry

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Split:
    """One split: labels, source positions, and either in-memory images or files."""

    labels: np.ndarray  # int64 (N,)
    index: np.ndarray  # int64 (N,), position in the source dataset
    images: np.ndarray | None = None  # uint8 (N, H, W, 3)
    files: tuple[Path, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> Split:
        return Split(
            labels=self.labels[rows],
            index=self.index[rows],
            images=None if self.images is None else self.images[rows],
            files=None if self.files is None else tuple(self.files[i] for i in rows),
        )


@dataclass(frozen=True)
class Dataset:
    key: str  # cache sub-folder, e.g. "cifar10" or "folder-footwear"
    classes: tuple[str, ...]
    splits: dict[str, Split]


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

    def __post_init__(self):
        for flag, value in (("--limit-train", self.limit_train), ("--limit-test", self.limit_test)):
            if value is not None and value < 1:
                raise FeatcacheError(f"{flag} must be a positive number of images. Got {value} instead.")
        if not 0 < self.test_fraction < 1:
            raise FeatcacheError(f"--test-fraction must lie between 0 and 1. Got {self.test_fraction} instead.")

    def common_identity(self) -> dict:
        return {"limit_train": self.limit_train, "limit_test": self.limit_test, "seed": self.seed}


@dataclass(frozen=True)
class DatasetEntry:
    key: callable  # (request) -> cache sub-folder name
    identity: callable  # (request) -> dict, cheap
    load: callable  # (request) -> Dataset before limits


DATASETS = Registry("--dataset")


def dataset_key(request: DataRequest) -> str:
    return DATASETS.lookup(request.name).key(request)


def dataset_identity(request: DataRequest) -> dict:
    """Everything that identifies the images and labels a request yields."""
    entry = DATASETS.lookup(request.name)
    return {"name": request.name, **entry.identity(request), **request.common_identity()}


def load_dataset(request: DataRequest) -> Dataset:
    """Load the dataset and apply the stratified ``--limit-train/--limit-test`` subsets."""
    data = DATASETS.lookup(request.name).load(request)
    limits = {"train": request.limit_train, "test": request.limit_test}
    splits = {name: _limit(split, limits[name], request.seed) for name, split in data.splits.items()}
    return Dataset(data.key, data.classes, splits)


def _limit(split: Split, n: int | None, seed: int) -> Split:
    """A stratified subset of ``n`` rows kept in source order (all rows if n >= N)."""
    if n is None or n >= len(split):
        return split
    rows = _stratified_pick(split.labels, n, seed)
    return split.take(np.sort(rows))


def _stratified_pick(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(labels))
    counts = np.bincount(labels)
    # Stratification needs every class at least twice and room for every class.
    can_stratify = counts[counts > 0].min() >= 2 and len(counts[counts > 0]) <= n <= len(labels) - len(counts[counts > 0])
    picked, _ = train_test_split(
        positions, train_size=n, random_state=seed, stratify=labels if can_stratify else None
    )
    return picked


def _split_train_test(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test positions, each kept in source order."""
    n_test = max(1, int(round(test_fraction * len(labels))))
    if n_test >= len(labels):
        raise FeatcacheError(f"a dataset of {len(labels)} images is too small to split off a test set")
    test = np.sort(_stratified_pick(labels, n_test, seed))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def _rgb_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) arrays of any range -> uint8 (N, H, W, 3)."""
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    return np.ascontiguousarray(images.astype(np.uint8))


# --- digits: scikit-learn's bundled 8x8 images, the offline default ----------------------


def _digits_load(request: DataRequest) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.round(bunch.images * (255.0 / 16.0))  # 0..16 grey levels -> 0..255
    images = _rgb_uint8(pixels)
    labels = bunch.target.astype(np.int64)
    train, test = _split_train_test(labels, request.test_fraction, request.seed)
    splits = {
        name: Split(labels=labels[rows], index=rows.astype(np.int64), images=images[rows])
        for name, rows in (("train", train), ("test", test))
    }
    return Dataset("digits", tuple(str(c) for c in bunch.target_names), splits)


DATASETS.register("digits")(
    DatasetEntry(
        key=lambda r: "digits",
        identity=lambda r: {"source": "sklearn.datasets.load_digits", "test_fraction": r.test_fraction},
        load=_digits_load,
    )
)


# --- cifar10: torchvision's loader ----------------------------------------------------


def _cifar_root(request: DataRequest) -> Path:
    return Path(request.data_dir) if request.data_dir is not None else Path("data")


def _cifar_identity(request: DataRequest) -> dict:
    from torchvision.datasets import CIFAR10

    # The md5 sums torchvision verifies pin down the files' contents.
    return {"files": sorted(md5 for _, md5 in CIFAR10.train_list + CIFAR10.test_list)}


def _cifar_load(request: DataRequest) -> Dataset:
    from torchvision.datasets import CIFAR10

    root = _cifar_root(request)
    made = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)  # the first folder a download makes
    splits = {}
    for name in SPLITS:
        try:
            ds = CIFAR10(root=str(root), train=name == "train", download=request.download)
        except (RuntimeError, OSError) as exc:
            if made is not None:  # a failed download leaves no empty or half-filled folder behind
                shutil.rmtree(made, ignore_errors=True)
            if isinstance(exc, RuntimeError):
                raise FeatcacheError(
                    f"CIFAR-10 not found or corrupted in {root / CIFAR10.base_folder}: pass --download, "
                    f"or --data-dir pointing at the folder that holds {CIFAR10.base_folder}/"
                ) from exc
            raise FeatcacheError(f"cannot download CIFAR-10 into {root}: {exc}") from exc  # no network
        labels = np.asarray(ds.targets, dtype=np.int64)
        splits[name] = Split(labels=labels, index=np.arange(len(labels), dtype=np.int64), images=_rgb_uint8(ds.data))
    return Dataset("cifar10", tuple(ds.classes), splits)


DATASETS.register("cifar10")(DatasetEntry(key=lambda r: "cifar10", identity=_cifar_identity, load=_cifar_load))


# --- folder: one sub-folder per class, optional train/ and test/ ------------------------


def _folder_root(request: DataRequest) -> Path:
    if request.data_dir is None:
        raise FeatcacheError("--dataset folder needs --data-dir DIR (one sub-folder of images per class)")
    root = Path(request.data_dir)
    if not root.is_dir():
        raise FeatcacheError(f"data directory {root} does not exist: check --data-dir")
    return root


def _class_files(root: Path) -> dict[str, list[Path]]:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FeatcacheError(f"no class folders in {root}: --data-dir must hold one sub-folder of images per class")
    found = {}
    for folder in classes:
        files = images_in(folder)
        if not files:
            raise FeatcacheError(f"class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        found[folder.name] = files
    return found


def _folder_layout(request: DataRequest) -> dict[str, dict[str, list[Path]]] | dict[str, list[Path]]:
    root = _folder_root(request)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return {name: _class_files(root / name) for name in SPLITS}
    return _class_files(root)


def _folder_identity(request: DataRequest) -> dict:
    root = _folder_root(request)
    digest = hashlib.sha256()
    for parts, entry in files_under(root):
        stat = entry.stat()
        digest.update(json.dumps(["/".join(parts), stat.st_size, stat.st_mtime_ns]).encode())
    return {"root": root.resolve().name, "files": digest.hexdigest(), "test_fraction": request.test_fraction}


def _folder_load(request: DataRequest) -> Dataset:
    layout = _folder_layout(request)
    key = f"folder-{_folder_root(request).resolve().name}"
    if set(layout) == set(SPLITS):  # explicit train/ and test/
        classes = sorted(set(layout["train"]) | set(layout["test"]))
        _two_classes(classes, _folder_root(request))
        splits = {}
        for name in SPLITS:
            files, labels = _flatten(layout[name], classes)
            splits[name] = Split(labels=labels, index=np.arange(len(labels), dtype=np.int64), files=files)
        return Dataset(key, tuple(classes), splits)
    classes = sorted(layout)
    _two_classes(classes, _folder_root(request))
    files, labels = _flatten(layout, classes)
    train, test = _split_train_test(labels, request.test_fraction, request.seed)
    splits = {
        name: Split(labels=labels[rows], index=rows.astype(np.int64), files=tuple(files[i] for i in rows))
        for name, rows in (("train", train), ("test", test))
    }
    return Dataset(key, tuple(classes), splits)


def _two_classes(classes: list[str], root: Path) -> None:
    if len(classes) < 2:
        raise FeatcacheError(f"{root} holds one class folder ({classes[0]}): a classifier needs at least two, "
                             f"one sub-folder of images per class")


def _flatten(by_class: dict[str, list[Path]], classes: list[str]) -> tuple[tuple[Path, ...], np.ndarray]:
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in by_class.get(name, []):
            files.append(path)
            labels.append(label)
    return tuple(files), np.asarray(labels, dtype=np.int64)


DATASETS.register("folder")(
    DatasetEntry(
        key=lambda r: f"folder-{_folder_root(r).resolve().name}",
        identity=_folder_identity,
        load=_folder_load,
    )
)
