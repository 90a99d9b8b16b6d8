"""torchvision's image-classification datasets by name (cifar10, flowers102, dtd ...), with their official splits.

Stage 1 (data: a source of ``source.DATASETS``). One table row per dataset says which torchvision class reads
it, the keyword of each of its own splits (train, and validation and test where it has them), its label type
and what it holds below ``--data-dir``. torchvision reads the files; what it hands back becomes featcache's
split the fastest way the dataset allows: arrays stay in memory (CIFAR, MNIST, SVHN, STL-10), file lists are
decoded by the workers as a folder is (Flowers102, DTD, Food-101 ...), anything else is read item by item.

Checksums are verified after a download (torchvision's download verifies the archive), not on every read: a
directory in the dataset's on-disk format loads as it is, and the cache fingerprint holds a hash of its files'
names, sizes and modification times, so a changed file re-extracts. A file loaded as it is cannot run code:
CIFAR's pickled batches go through a restricted unpickler (``safe.restricted_load``); the other formats
torchvision reads here are arrays, images, text, MATLAB and HDF5 files (ImageNet's meta.bin and MNIST's legacy
files through ``torch.load(weights_only=True)``). Images and labels that disagree in count are refused.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.data.images import Blob
from featcache.data.safe import UnsafeFile, restricted_load
from featcache.data.source import (DATASETS, Dataset, DatasetEntry, DataRequest, Rows, Split, files_identity,
                                   official_splits, rgb_uint8)
from featcache.errors import FeatcacheError


@dataclass(frozen=True)
class TorchvisionSet:
    """One torchvision dataset: how to read each of its splits and what it holds."""

    cls: str  # torchvision.datasets class
    folder: str  # what it reads below --data-dir (a folder, or files named by `files`)
    classes: int
    splits: dict  # "train" / "val" / "test" -> keywords of the class; no "val": carved from train; no "test": too
    kwargs: dict = field(default_factory=dict)  # the label type etc., the same for every split
    files: tuple[str, ...] = ()  # when `folder` is "": the files below --data-dir that make the dataset
    download: bool = True
    names: tuple[str, ...] = ()  # class names where torchvision has none
    note: str = ""  # the label type chosen, or how the splits map

    def describe(self, name: str) -> list[str]:
        own = ", ".join(f"{ours} = {_spell(kw)}" for ours, kw in self.splits.items())
        lines = [f"{name}: torchvision.datasets.{self.cls}, {self.classes} classes",
                 f"  reads: --data-dir/{self.folder or ' + '.join(self.files)}"
                 + ("" if self.download else " (no download: torchvision cannot fetch it; place the files by hand)"),
                 f"  splits: {own}",
                 "  validation: " + ("the dataset's own validation split" if "val" in self.splits
                                     else "carved from train (stratified, seeded; --val-fraction)"),
                 *([] if "test" in self.splits else ["  test: carved from all images (--test-fraction)"])]
        if self.kwargs:
            lines.append(f"  labels: {_spell(self.kwargs)}" + (f" ({self.note})" if self.note else ""))
        elif self.note:
            lines.append(f"  note: {self.note}")
        return lines


def _spell(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "(all)"


TRAIN_TEST = {"train": {"train": True}, "test": {"train": False}}
SPLIT_TRAIN_TEST = {"train": {"split": "train"}, "test": {"split": "test"}}
SPLIT_ALL = {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}}
DIGITS = tuple(str(i) for i in range(10))

TORCHVISION_SETS = {
    "cifar10": TorchvisionSet("CIFAR10", "cifar-10-batches-py", 10, TRAIN_TEST),
    "cifar100": TorchvisionSet("CIFAR100", "cifar-100-python", 100, TRAIN_TEST, note="the 100 fine labels"),
    "mnist": TorchvisionSet("MNIST", "MNIST", 10, TRAIN_TEST),
    "fashionmnist": TorchvisionSet("FashionMNIST", "FashionMNIST", 10, TRAIN_TEST),
    "kmnist": TorchvisionSet("KMNIST", "KMNIST", 10, TRAIN_TEST),
    "emnist": TorchvisionSet("EMNIST", "EMNIST", 47, TRAIN_TEST, kwargs={"split": "balanced"},
                             note="the balanced split's 47 classes (digits and letters)"),
    "qmnist": TorchvisionSet("QMNIST", "QMNIST", 10, {"train": {"what": "train"}, "test": {"what": "test"}}),
    "semeion": TorchvisionSet("SEMEION", "", 10, {"train": {}}, files=("semeion.data",), names=DIGITS,
                              note="no official split"),
    "clevrcount": TorchvisionSet("CLEVRClassification", "clevr", 8,
                                 {"train": {"split": "train"}, "test": {"split": "val"}},
                                 names=tuple(str(k) for k in range(3, 11)),
                                 note="objects per scene, 3 to 10; its test split has no labels, so its 'val' split "
                                      "is the test set"),
    "usps": TorchvisionSet("USPS", "", 10, TRAIN_TEST, files=("usps.bz2", "usps.t.bz2"), names=DIGITS),
    "svhn": TorchvisionSet("SVHN", "", 10, SPLIT_TRAIN_TEST, files=("train_32x32.mat", "test_32x32.mat"),
                           names=DIGITS, note="the cropped digits; the 'extra' split is not used"),
    "stl10": TorchvisionSet("STL10", "stl10_binary", 10, SPLIT_TRAIN_TEST, note="the unlabeled split is not used"),
    "flowers102": TorchvisionSet("Flowers102", "flowers-102", 102, SPLIT_ALL,
                                 names=tuple(f"class {i}" for i in range(1, 103))),
    "food101": TorchvisionSet("Food101", "food-101", 101, SPLIT_TRAIN_TEST),
    "dtd": TorchvisionSet("DTD", "dtd", 47, SPLIT_ALL, kwargs={"partition": 1}, note="the first of ten partitions"),
    "oxfordiiitpet": TorchvisionSet("OxfordIIITPet", "oxford-iiit-pet", 37,
                                    {"train": {"split": "trainval"}, "test": {"split": "test"}},
                                    kwargs={"target_types": "category"},
                                    note="the 37 breeds; binary-category and segmentation are not classification"),
    "fgvcaircraft": TorchvisionSet("FGVCAircraft", "fgvc-aircraft-2013b", 100, SPLIT_ALL,
                                   kwargs={"annotation_level": "variant"}, note="the 100 variants; family and "
                                   "manufacturer are coarser label types"),
    "stanfordcars": TorchvisionSet("StanfordCars", "stanford_cars", 196, SPLIT_TRAIN_TEST, download=False),
    "caltech101": TorchvisionSet("Caltech101", "caltech101", 101, {"train": {}}, kwargs={"target_type": "category"},
                                 note="the 101 categories, without BACKGROUND_Google; no official split"),
    "caltech256": TorchvisionSet("Caltech256", "caltech256", 257, {"train": {}}, note="no official split"),
    "sun397": TorchvisionSet("SUN397", "SUN397", 397, {"train": {}}, note="no official split in torchvision"),
    "eurosat": TorchvisionSet("EuroSAT", "eurosat", 10, {"train": {}}, note="RGB; no official split"),
    "gtsrb": TorchvisionSet("GTSRB", "gtsrb", 43, SPLIT_TRAIN_TEST, names=tuple(str(i) for i in range(43))),
    "pcam": TorchvisionSet("PCAM", "pcam", 2, SPLIT_ALL, names=("no tumor", "tumor")),
    "country211": TorchvisionSet("Country211", "country211", 211,
                                 {"train": {"split": "train"}, "val": {"split": "valid"}, "test": {"split": "test"}}),
    "fer2013": TorchvisionSet("FER2013", "fer2013", 7, SPLIT_TRAIN_TEST, download=False,
                              names=("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"),
                              note="test labels need fer2013.csv or icml_face_data.csv (Kaggle's test.csv has none)"),
    "imagenette": TorchvisionSet("Imagenette", "imagenette2", 10, {"train": {"split": "train"}, "test": {"split": "val"}},
                                 kwargs={"size": "full"}, note="its 'val' split is the held-out test set"),
    "renderedsst2": TorchvisionSet("RenderedSST2", "rendered-sst2", 2, SPLIT_ALL),
    "places365": TorchvisionSet("Places365", "", 365, {"train": {"split": "train-standard"}, "test": {"split": "val"}},
                                files=("categories_places365.txt", "places365_train_standard.txt",
                                       "places365_val.txt", "data_large_standard", "val_large"),
                                note="its 'val' split is the held-out test set"),
    "imagenet": TorchvisionSet("ImageNet", "", 1000, {"train": {"split": "train"}, "test": {"split": "val"}},
                               files=("ILSVRC2012_devkit_t12.tar.gz", "meta.bin", "train", "val"), download=False,
                               note="its 'val' split is the held-out test set"),
}


def _root(request: DataRequest) -> Path:
    return Path(request.data_dir) if request.data_dir is not None else Path("data")


def _identity(name: str, request: DataRequest) -> dict:
    spec = TORCHVISION_SETS[name]
    root = _root(request)
    base = root / spec.folder if spec.folder else root
    if not base.exists() and request.download and spec.download:
        _load(name, request)  # fetched now, so the fingerprint holds the files the cache is made from
    if not base.exists():
        return {"source": f"torchvision.{spec.cls}", "files": None}  # load() names what is missing
    files = files_identity(base, only=set(spec.files) if spec.files else None)
    return {"source": f"torchvision.{spec.cls}", "kwargs": spec.kwargs, "files": files,
            **({"test_fraction": request.test_fraction} if "test" not in spec.splits else {})}


class _SafePickle:
    """Stands for the ``pickle`` module inside a torchvision dataset module that unpickles its files (CIFAR's
    batches): the same ``load``, through :func:`~featcache.data.safe.restricted_load`, which admits only the
    lists, dicts and arrays the format holds. A crafted batch that would run code is refused in one line."""

    def __init__(self, module):
        self.module = module

    @staticmethod
    def load(file, encoding="latin1", **kwargs):
        return restricted_load(file, encoding=encoding, where=getattr(file, "name", "a pickled batch"))

    def __getattr__(self, name):
        return getattr(self.module, name)


@contextlib.contextmanager
def _files_as_they_are(cls, download: bool):
    """torchvision checks some datasets' md5 sums on every read (CIFAR, SVHN, STL-10, Flowers102 ...): here a
    file that exists is taken as it is, and the sums are checked only when downloading. A file taken as it is
    is never trusted as code: where the module unpickles (CIFAR), it unpickles through the restricted loader,
    downloaded or not."""
    module = sys.modules[cls.__module__]
    original = getattr(module, "check_integrity", None)
    pickled = getattr(module, "pickle", None)
    with contextlib.ExitStack() as undo:
        if pickled is not None:
            module.pickle = _SafePickle(pickled)
            undo.callback(setattr, module, "pickle", pickled)
        if not download and original is not None:
            module.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)
            undo.callback(setattr, module, "check_integrity", original)
        yield


def _open(name: str, spec: TorchvisionSet, keywords: dict, request: DataRequest):
    import torchvision.datasets as tv

    cls = getattr(tv, spec.cls)
    root = _root(request)
    present = (root / spec.folder).exists() if spec.folder else all((root / f).exists() for f in spec.files)
    download = request.download and spec.download and not present  # a copy on disk is read as it is
    if request.download and not spec.download and not present:
        raise FeatcacheError(f"torchvision cannot download {name}: place its files under {root / spec.folder} "
                             f"by hand (featcache datasets {name} says which)")
    made = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)  # the first folder we make
    args = {**spec.kwargs, **keywords}
    if "download" in inspect.signature(cls.__init__).parameters:  # explicit: SEMEION downloads by default
        args["download"] = download
    try:
        with _files_as_they_are(cls, download), _quiet():
            return cls(root=str(root), **args)
    except UnsafeFile:
        raise
    except Exception as exc:  # torchvision raises RuntimeError for a missing dataset, others for a malformed one
        if made is not None:  # a failed download leaves no empty or half-filled folder behind
            shutil.rmtree(made, ignore_errors=True)
        where = root / spec.folder if spec.folder else root
        if download:
            raise FeatcacheError(f"cannot download {name} into {root}: {_first_line(exc)}") from None
        expected = spec.folder + "/" if spec.folder else " + ".join(spec.files)
        why = "" if "download=True" in str(exc) else f" ({_first_line(exc)})"  # torchvision's generic 'not found'
        raise FeatcacheError(f"{name} not found or not in torchvision's {spec.cls} format in {where}{why}: "
                             f"--data-dir must hold {expected}" + (" (or pass --download)" if spec.download else "")
                             ) from None


@contextlib.contextmanager
def _quiet():
    """torchvision prints 'Files already downloaded and verified': featcache says what it does itself."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


class TorchvisionItems:
    """Reads images of a torchvision dataset item by item (``ds[i]``), for datasets that keep neither arrays nor
    a file list (PCAM's HDF5, Caltech's folders)."""

    def __init__(self, ds, name: str):
        self.ds, self.name = ds, name

    def blob(self, position: int) -> Blob:
        return _Item(self, position)


class _Item(Blob):
    def __init__(self, items: TorchvisionItems, position: int):
        self.items, self.position = items, position

    def read(self):
        image = self.items.ds[self.position][0]
        return image if not hasattr(image, "numpy") else image.numpy()

    def __str__(self):
        return f"{self.items.name}[{self.position}]"


def _labels(ds) -> np.ndarray:
    for attr in ("targets", "labels", "_labels", "y"):
        value = getattr(ds, attr, None)
        if value is not None and hasattr(value, "__len__"):
            if len(value) != len(ds):  # STL-10's train_y.bin with more labels than images ...
                raise FeatcacheError(f"{type(ds).__name__} in {getattr(ds, 'root', '--data-dir')} holds {len(ds)} "
                                     f"images and {len(value)} labels: the files disagree; place the dataset's "
                                     f"published files")
            return np.asarray(value, dtype=np.int64).reshape(-1)
    for attr in ("_samples", "samples", "imgs"):
        pairs = getattr(ds, attr, None)
        if pairs is not None:
            return np.asarray([pair[1] for pair in pairs], dtype=np.int64)
    if hasattr(ds, "_FILES") and hasattr(ds, "_base_folder"):  # PCAM: the labels' own HDF5 file
        import h5py

        with h5py.File(ds._base_folder / ds._FILES[ds._split]["targets"][0], "r") as f:
            return np.asarray(f["y"][:], dtype=np.int64).reshape(-1)
    return np.asarray([ds[i][1] for i in range(len(ds))], dtype=np.int64)


def _split(ds, name: str, part: str) -> Split:
    """One torchvision split as featcache's: arrays in memory, a file list, or items read one by one."""
    import torch

    index = np.arange(len(ds), dtype=np.int64)
    data = getattr(ds, "data", None)
    if isinstance(data, (np.ndarray, torch.Tensor)) and data.ndim in (3, 4) and len(data) == len(ds):
        pixels = data.numpy() if isinstance(data, torch.Tensor) else data
        if pixels.ndim == 4 and pixels.shape[1] in (1, 3) and pixels.shape[-1] not in (1, 3):
            pixels = pixels.transpose(0, 2, 3, 1)  # SVHN and STL-10 store (N, C, H, W)
        if pixels.ndim == 4 and pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        return Split(labels=_labels(ds), index=index, images=rgb_uint8(pixels))
    for files_attr in ("_image_files", "_images"):
        files = getattr(ds, files_attr, None)
        if files is not None and hasattr(ds, "_labels"):
            return Split(labels=_labels(ds), index=index, files=tuple(Path(f) for f in files))
    for attr in ("_samples", "samples", "imgs"):
        pairs = getattr(ds, attr, None)
        if pairs and isinstance(pairs[0][0], (str, os.PathLike)):
            return Split(labels=_labels(ds), index=index, files=tuple(Path(p) for p, _ in pairs))
        if pairs and isinstance(pairs[0][0], torch.Tensor):  # FER2013: 48 x 48 pixels in memory
            if any(label is None for _, label in pairs):
                raise FeatcacheError(f"{name}'s {part} split has no labels in this copy (Kaggle's test.csv): place "
                                     f"fer2013.csv or icml_face_data.csv in the fer2013 folder")
            return Split(labels=_labels(ds), index=index, images=rgb_uint8(torch.stack([p for p, _ in pairs]).numpy()))
    return Split(labels=_labels(ds), index=index, files=Rows([(TorchvisionItems(ds, f"{name}/{part}"), index)]))


def _classes(ds, spec: TorchvisionSet) -> tuple[str, ...]:
    if spec.names:
        return spec.names
    names = getattr(ds, "classes", None) or getattr(ds, "categories", None)
    if names:
        return tuple(" / ".join(n) if isinstance(n, (tuple, list)) else str(n) for n in names)
    return tuple(str(i) for i in range(spec.classes))


def _renumbered(split: Split, own: tuple, classes: tuple, name: str, part: str) -> Split:
    """A split's labels in the train split's class numbering (matched by class name)."""
    number = {c: k for k, c in enumerate(classes)}
    unknown = sorted(set(own) - set(number))
    if unknown:
        raise FeatcacheError(f"{name}'s {part} split has classes the train split lacks ({', '.join(unknown[:5])}): "
                             f"the files are incomplete")
    mapping = np.asarray([number[c] for c in own], dtype=np.int64)
    return Split(labels=mapping[split.labels], index=split.index, images=split.images, files=split.files)


def _load(name: str, request: DataRequest) -> Dataset:
    spec = TORCHVISION_SETS[name]
    parts, classes = {}, None
    for part, keywords in spec.splits.items():
        ds = _open(name, spec, keywords, request)
        split, own = _split(ds, name, part), _classes(ds, spec)
        if classes is not None and own != classes:  # DTD, Pets: each split names the classes it holds
            split = _renumbered(split, own, classes, name, part)
        parts[part] = split
        classes = classes or own
    splits = official_splits(parts, request)
    top = max(int(s.labels.max()) for s in splits.values() if len(s))
    if top >= len(classes):
        raise FeatcacheError(f"{name} in {_root(request)} has label {top}, beyond its {len(classes)} classes: "
                             f"the files are not {name}'s")
    about = {"source": f"torchvision.datasets.{spec.cls}", "splits": {k: _spell(v) for k, v in spec.splits.items()}}
    return Dataset(name, classes, splits, about)


def _register(name: str) -> None:
    spec = TORCHVISION_SETS[name]
    DATASETS.register(name)(DatasetEntry(
        key=lambda r: name,
        identity=lambda r: _identity(name, r),
        load=lambda r: _load(name, r),
        about=f"torchvision.datasets.{spec.cls}: {spec.classes} classes, splits "
              f"{'/'.join(spec.splits) if len(spec.splits) > 1 else 'none (carved)'}",
        describe=spec.describe,
    ))


for _name in TORCHVISION_SETS:
    _register(_name)
