"""Every dataset source in one registry, and the two of its own: scikit-learn's digits and a folder per class.

Stage 1 (**data** -> backbones -> extraction). The sources register into ``source.DATASETS`` on import:
``torchvision_sets`` (CIFAR-10/100, Flowers102, DTD ... by name, with their official splits), ``hub`` (Hugging
Face datasets), ``manifest`` (CSV / Parquet of paths and labels), ``shards`` (WebDataset tar shards).
Small images stay in memory as uint8 ``(N, H, W, 3)`` so the extractor can ship whole batches to the device;
photo folders, manifests, shards and Arrow tables are lists of files (or ``Blob`` entries) that DataLoader
workers decode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.data import hub, manifest, shards, torchvision_sets  # noqa: F401  (each registers its sources)
from featcache.data.images import IMAGE_SUFFIXES, images_in
from featcache.data.leakage import leakage
from featcache.data.source import (DATASETS, SPLITS, Dataset, DatasetEntry, DataRequest, Split, files_identity,
                                   limit, rgb_uint8, split_train_test)
from featcache.errors import DataError, FeatcacheError

__all__ = ["DATASETS", "Dataset", "DatasetEntry", "DataRequest", "Split", "dataset_identity", "dataset_key",
           "image_entries", "load_dataset"]


def infer_source(data_dir) -> str:
    """The source that reads what ``--data-dir`` holds, when ``--dataset`` is not given: a manifest file, a
    shard or a folder of shards, a saved Hugging Face dataset (or its Parquet / Arrow files), a torchvision
    dataset's own folder, a folder of class folders. Anything else is refused: a path given is never replaced
    by the default digits."""
    from featcache.data.torchvision_sets import TORCHVISION_SETS

    path = Path(data_dir)
    if "{" in str(data_dir) and ".tar" in str(data_dir):
        return "webdataset"  # a brace pattern of shards: train-{000000..000099}.tar
    if not path.exists():
        raise FeatcacheError(f"--data-dir {path} does not exist")
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix in (".csv", ".tsv"):
            return "manifest"
        if suffix == ".tar":
            return "webdataset"
        if suffix in (".parquet", ".arrow"):
            return "hf" if suffix == ".arrow" or hub.has_image_column(path) else "manifest"
        raise FeatcacheError(f"cannot tell what --data-dir {path} holds: a file given as data is a manifest (.csv, "
                             f".tsv, .parquet), a shard (.tar) or Arrow data; or pass --dataset")
    if not path.is_dir():
        raise FeatcacheError(f"--data-dir {path} is neither a file nor a folder")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "hf"
    found = [name for name, spec in TORCHVISION_SETS.items() if spec.folder and (path / spec.folder).is_dir()]
    if len(found) == 1:
        return found[0]
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if any(p.suffix == ".tar" for p in entries) or any(p.is_dir() and next(p.glob("*.tar"), None) for p in entries):
        return "webdataset"
    if any(p.suffix in (".parquet", ".arrow") for p in entries):
        return "hf"
    folders = [p for p in entries if p.is_dir()]
    if folders and any(images_in(p) for p in folders):
        return "folder"
    raise FeatcacheError(f"cannot tell what --data-dir {path} holds (no class folders of images, shards, manifest, "
                         f"Hugging Face dataset or torchvision dataset folder): pass --dataset; featcache datasets "
                         f"lists the sources")


def dataset_key(request: DataRequest) -> str:
    return DATASETS.lookup(request.name).key(request)


def dataset_identity(request: DataRequest) -> dict:
    """Everything that identifies the images and labels a request yields."""
    entry = DATASETS.lookup(request.name)
    return {"name": request.name, **entry.identity(request), **request.common_identity()}


def load_dataset(request: DataRequest) -> Dataset:
    """Load the dataset and apply the stratified ``--limit-train/--limit-test`` subsets; a problem with the data
    is a :class:`~featcache.errors.DataError`."""
    try:
        return _load(request)
    except DataError:
        raise
    except FeatcacheError as exc:
        raise DataError(str(exc)) from None


def _load(request: DataRequest) -> Dataset:
    data = DATASETS.lookup(request.name).load(request)
    limits = {"train": request.limit_train, "test": request.limit_test}
    splits = {name: limit(split, limits[name], request.seed) for name, split in data.splits.items()}
    notes = data.notes + tuple(n for n in [leakage(splits["train"], splits["test"])] if n)
    return Dataset(data.key, data.classes, splits, data.about, notes)


# --- digits: scikit-learn's bundled 8x8 images, the offline default ----------------------


def _digits_load(request: DataRequest) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.round(bunch.images * (255.0 / 16.0))  # 0..16 grey levels -> 0..255
    images = rgb_uint8(pixels)
    labels = bunch.target.astype(np.int64)
    train, test = split_train_test(labels, request.test_fraction, request.seed)
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
        about="scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; offline); test carved",
    )
)


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
    return {"root": root.resolve().name, "files": files_identity(root), "test_fraction": request.test_fraction}


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
    train, test = split_train_test(labels, request.test_fraction, request.seed)
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
        about="a folder of one sub-folder of images per class (optionally under train/ and test/): --data-dir DIR",
    )
)


def image_entries(args) -> list:
    """What ``featcache predict`` classifies: files, folders and glob patterns (:func:`images.image_paths`), and
    whole sources given by their file: a manifest (``.csv``, ``.tsv``, ``.parquet``: the images it names), a
    WebDataset shard (``.tar``: each sample's image), a Hugging Face ``save_to_disk`` folder (each row's image)."""
    from featcache.data.images import image_paths

    out: list = []
    for arg in map(str, args):
        path = Path(arg)
        if path.is_file() and path.suffix.lower() in (".csv", ".tsv", ".parquet"):
            out += manifest.image_files(path)
        elif path.is_file() and path.suffix.lower() == ".tar":
            out += shards.image_members(path)
        elif path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            out += hub.image_rows(path)
        else:
            out += image_paths([arg])
    return out
