"""A manifest: a CSV or Parquet file with a row per image (path, label and, optionally, split).

Stage 1 (data: the ``manifest`` source of ``source.DATASETS``). The way Kaggle and many labs share labels:
``--data-dir labels.csv`` with columns ``path`` and ``label`` (other names with ``--image-column`` /
``--label-column``); a relative path resolves from the manifest's folder; labels are strings or integers (the
class names are the distinct values present, numbers in numeric order, so ``1`` and ``01`` are one class;
a missing label in any spelling is refused with its count; an image named twice is refused). A ``split`` column (train / val or validation / test) gives the
official splits; without one, test is carved from all rows (``--test-fraction``). A file named in the manifest
that is missing is an unreadable image like any other: named, or counted and left out with
``--skip-bad-images``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from featcache.data.source import DATASETS, Dataset, DatasetEntry, DataRequest, Split, official_splits, \
    stat_identity
from featcache.data.labels import label_classes
from featcache.errors import FeatcacheError

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}


def _path(request: DataRequest) -> Path:
    if request.data_dir is None:
        raise FeatcacheError("--dataset manifest needs --data-dir FILE (a .csv or .parquet with path and label columns)")
    path = Path(request.data_dir)
    if not path.is_file():
        raise FeatcacheError(f"no manifest at {path}: --data-dir must name a .csv or .parquet file")
    if path.suffix.lower() not in (".csv", ".parquet", ".tsv"):
        raise FeatcacheError(f"{path} is not a manifest: expected a .csv, .tsv or .parquet file")
    return path


def _read(request: DataRequest, need_label: bool = True):
    import pandas as pd

    path = _path(request)
    try:
        if path.suffix.lower() == ".parquet":
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str,
                                keep_default_na=False)
    except ImportError:
        raise FeatcacheError("reading a Parquet manifest needs pyarrow: pip install 'featcache[hub]'") from None
    except Exception as exc:  # pandas' parser errors come as several types
        raise FeatcacheError(f"cannot read manifest {path}: {str(exc).splitlines()[0][:200]}") from None
    image = request.image_column or "path"
    label = request.label_column or "label"
    absent = [(flag, column) for flag, column in (("--image-column", image), ("--label-column", label))
              [: 2 if need_label else 1] if column not in table.columns]
    if absent:
        raise FeatcacheError(f"manifest {path} has no {' or '.join(repr(c) for _, c in absent)} column "
                             f"({', '.join(f for f, _ in absent)}); its columns are {', '.join(map(str, table.columns))}")
    if len(table) == 0:
        raise FeatcacheError(f"manifest {path} has no rows")
    return path, table, image, label


def _files(path: Path, table, image: str) -> list[Path]:
    base = path.parent
    out = []
    for k, value in enumerate(table[image].tolist()):
        if not isinstance(value, str) or not value.strip():
            raise FeatcacheError(f"row {k + 2} of manifest {path} has an empty {image!r}")
        file = Path(value)
        out.append(file if file.is_absolute() else base / file)
    return out


def _load(request: DataRequest) -> Dataset:
    path, table, image, label = _read(request)
    files = _files(path, table, image)
    _no_duplicates(path, files)
    names, numbers, notes = label_classes({"train": table[label].tolist()}, f"manifest {path} (column {label!r})",
                                          row=lambda _, k: f"row {k + 2}")
    labels = numbers["train"]
    if len(names) < 2:
        raise FeatcacheError(f"manifest {path} names one class ({names[0]}): a classifier needs at least two")
    if "split" in table.columns:
        given = [str(v).strip().lower() for v in table["split"].tolist()]
        unknown = sorted({v for v in given if v not in SPLIT_NAMES})
        if unknown:
            raise FeatcacheError(f"manifest {path} has split value(s) {', '.join(map(repr, unknown))}: use train, "
                                 f"val (or validation) and test")
        ours = np.asarray([SPLIT_NAMES[v] for v in given])
    else:
        ours = np.full(len(files), "train")
    parts = {}
    for part in ("train", "val", "test"):
        rows = np.flatnonzero(ours == part)
        if len(rows):
            parts[part] = Split(labels=labels[rows], index=rows.astype(np.int64), files=tuple(files[i] for i in rows))
    if "train" not in parts:
        raise FeatcacheError(f"manifest {path} has no train rows")
    about = {"source": f"manifest {path.name}", "columns": {"image": image, "label": label}}
    return Dataset(_key(request), tuple(names), official_splits(parts, request), about, tuple(notes))


def _no_duplicates(path: Path, files: list[Path]) -> None:
    """A manifest naming one image twice puts it in train and test alike: refused, before any split is made."""
    first: dict[str, int] = {}
    repeated = []
    for row, file in enumerate(files):
        key = os.path.normpath(os.fspath(file))
        if key in first:
            repeated.append((first[key], row, file))
        else:
            first[key] = row
    if repeated:
        a, b, file = repeated[0]
        raise FeatcacheError(f"manifest {path} names {len(repeated)} image(s) more than once (first: "
                             f"{str(file)[-80:]} in rows {a + 2} and {b + 2}): a repeated image can land in train and "
                             f"test alike; list each image once")


def _key(request: DataRequest) -> str:
    return "manifest-" + _path(request).stem


def _identity(request: DataRequest) -> dict:
    path, table, image, _ = _read(request)
    return {"source": "manifest", "manifest": stat_identity([path]), "images": stat_identity(_files(path, table, image)),
            "image_column": request.image_column, "label_column": request.label_column,
            "test_fraction": request.test_fraction}


DATASETS.register("manifest")(DatasetEntry(
    key=_key, identity=_identity, load=_load,
    about="a CSV / Parquet file of path, label (and split) columns: --data-dir FILE",
))


def image_files(path: Path, column: str | None = None) -> list[Path]:
    """Every image a manifest names (labels not needed): what ``featcache predict labels.csv`` classifies."""
    _, table, image, _ = _read(DataRequest(name="manifest", data_dir=path, image_column=column,
                                           label_column=None), need_label=False)
    return _files(path, table, image)
