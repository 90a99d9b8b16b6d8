"""Hugging Face datasets: a ``save_to_disk`` folder, Parquet or Arrow files, or a dataset name from the local cache.

Stage 1 (data: the ``hf`` source of ``source.DATASETS``). The ``datasets`` library finds the files and the
features (which column is the Image, which the ClassLabel and its names); the pixels are then read straight from
the Arrow files (memory-mapped) or Parquet row groups, one image's bytes at a time in the DataLoader workers, so a
dataset larger than memory is never loaded whole. The splits are the dataset's own: ``train``, ``validation``
(also ``valid``, ``val``, ``dev``) as the official validation split, ``test``; a dataset without a test split has
one carved from train (``--test-fraction``).

Nothing is downloaded unless ``--download``: a name that is not in the local Hugging Face cache says so.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from featcache.data.images import Blob, file_bytes
from featcache.data.labels import label_classes
from featcache.data.safe import UnsafeFile, read_regular, regular_size
from featcache.data.source import DATASETS, Dataset, DatasetEntry, DataRequest, Rows, Split, official_splits, \
    stat_identity
from featcache.errors import FeatcacheError, need

OUR_SPLITS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val", "test": "test"}


def _split_of(file_name: str) -> str | None:
    """The split a Parquet/Arrow file belongs to by the Hub's naming (``train-00000-of-00002.parquet``,
    ``data/test-*.arrow``, ``validation.parquet``), or None."""
    stem = file_name.split(".")[0]
    head = stem.split("-")[0].split("_")[0].lower()
    return head if head in OUR_SPLITS else None


def _files(request: DataRequest) -> dict[str, list[Path]]:
    """The dataset's own split name -> its Arrow or Parquet files, in order."""
    if request.hf_name:
        return _cached(request)
    if request.data_dir is None:
        raise FeatcacheError("--dataset hf needs --data-dir (a save_to_disk folder, or Parquet / Arrow files) or "
                             "--hf-name NAME (a dataset in the local Hugging Face cache)")
    root = Path(request.data_dir)
    if not root.exists():
        raise FeatcacheError(f"{root} does not exist: --data-dir must be a save_to_disk folder or Parquet / Arrow files")
    if (root / "dataset_dict.json").is_file():  # a DatasetDict saved with save_to_disk
        try:
            names = json.loads(read_regular(root / "dataset_dict.json", "dataset_dict.json", 1 << 20))["splits"]
        except (ValueError, KeyError, TypeError, RecursionError, UnsafeFile):
            raise FeatcacheError(f"{root / 'dataset_dict.json'} is damaged: save the dataset again") from None
        if not isinstance(names, list) or not names or not all(_plain_name(n) for n in names):
            raise FeatcacheError(f"{root / 'dataset_dict.json'} names its splits {str(names)[:80]}: a split is a "
                                 f"folder name (train, test ...); save the dataset again")
        return {name: _arrow_files(root / name) for name in names}
    if (root / "state.json").is_file():  # one Dataset saved with save_to_disk
        return {"train": _arrow_files(root)}
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".arrow"))
    if not files or any(p.suffix not in (".parquet", ".arrow") for p in files):
        raise FeatcacheError(f"{root} holds no Hugging Face dataset: expected a save_to_disk folder "
                             f"(dataset_dict.json or state.json) or .parquet / .arrow files")
    out: dict[str, list[Path]] = {}
    for path in files:
        try:
            regular_size(path, "data file")
        except FileNotFoundError:  # a link to nothing
            raise FeatcacheError(f"{path} is missing (a broken link?): save the dataset again") from None
        out.setdefault(_split_of(path.name) or "train", []).append(path)
    return out


def _plain_name(name) -> bool:
    """A plain name of a file or folder inside the dataset's folder: no path separator, no parent, no NUL."""
    return isinstance(name, str) and bool(name) and name not in (".", "..") and "/" not in name and \
        "\\" not in name and "\0" not in name


def _arrow_files(folder: Path) -> list[Path]:
    """The Arrow files a save_to_disk folder's state.json lists: each a regular file inside the folder."""
    try:
        state = json.loads(read_regular(folder / "state.json", "state.json", 1 << 20))
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError, RecursionError, UnsafeFile):
        raise FeatcacheError(f"{folder} is not a save_to_disk folder (no readable state.json)") from None
    if not names:
        raise FeatcacheError(f"{folder / 'state.json'} lists no data files: save the dataset again")
    bad = [n for n in names if not _plain_name(n)]
    if bad:
        raise FeatcacheError(f"{folder / 'state.json'} names data file {str(bad[0])[:80]!r} outside its folder: "
                             f"featcache reads only the dataset's own files")
    files = [folder / n for n in names]
    for path in files:
        try:
            regular_size(path, "data file")
        except FileNotFoundError:
            raise FeatcacheError(f"{path} is missing: {folder / 'state.json'} lists it; save the dataset again") \
                from None
    return files


def _cached(request: DataRequest) -> dict[str, list[Path]]:
    """A Hub dataset's Arrow files in the local cache (downloaded first with --download)."""
    if not request.download:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    datasets = need("datasets", "--dataset hf")
    if not request.download:  # datasets read the variables above at its import: it may have been imported already
        datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True
    try:
        loaded = datasets.load_dataset(request.hf_name, request.hf_config)
    except Exception as exc:  # offline misses and bad names come as many types
        hint = "" if request.download else " (nothing is downloaded without --download)"
        raise FeatcacheError(f"cannot load Hugging Face dataset {request.hf_name!r}"
                             f"{f' config {request.hf_config!r}' if request.hf_config else ''} from the local "
                             f"cache{hint}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
    return {name: [Path(f["filename"]) for f in ds.cache_files] for name, ds in loaded.items()}


def _schema(path: Path):
    pa = need("pyarrow", "--dataset hf")
    with _readable(path):
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_schema(path)
        with pa.memory_map(str(path)) as source:
            return _open_arrow(pa, source).schema


@contextlib.contextmanager
def _readable(path):
    """pyarrow's errors for a lost, truncated or foreign file, as one line naming it."""
    try:
        yield
    except FeatcacheError:
        raise
    except FileNotFoundError:
        raise FeatcacheError(f"{path} is missing: save the dataset again") from None
    except Exception as exc:  # ArrowInvalid, OSError, ... : the file is not an Arrow / Parquet table
        raise FeatcacheError(f"{path} is not a readable {Path(path).suffix.lstrip('.').title()} file "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}): "
                             f"save the dataset again") from None


def _open_arrow(pa, source):
    try:
        return pa.ipc.open_stream(source)  # what datasets writes
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source)


def _features(schema) -> dict:
    """column -> its datasets feature (as a dict: {"_type": "Image"}, {"_type": "ClassLabel", "names": [...]})."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if meta:
        try:
            return json.loads(meta)["info"]["features"]
        except (ValueError, KeyError, TypeError):
            pass
    return {}


def _is_image(schema, features: dict, column: str) -> bool:
    import pyarrow as pa

    feature = features.get(column)
    if isinstance(feature, dict) and feature.get("_type") == "Image":
        return True
    kind = schema.field(column).type
    return pa.types.is_struct(kind) and {kind.field(k).name for k in range(kind.num_fields)} == {"bytes", "path"}


def has_image_column(path: Path) -> bool:
    """Whether a Parquet / Arrow file holds an Image column (a Hugging Face table, not a manifest of paths)."""
    try:
        schema = _schema(path)
    except FeatcacheError:
        return False
    features = _features(schema)
    return any(_is_image(schema, features, column) for column in schema.names)


def columns(schema, request: DataRequest) -> tuple[str, str, list[str] | None]:
    """(image column, label column, class names from the ClassLabel feature or None)."""
    features = _features(schema)
    names = list(schema.names)
    image = request.image_column or _only([c for c in names if _is_image(schema, features, c)], "Image", names,
                                          "--image-column")
    label = request.label_column or _only(
        [c for c in names if isinstance(features.get(c), dict) and features[c].get("_type") == "ClassLabel"],
        "ClassLabel", names, "--label-column")
    for flag, column in (("--image-column", image), ("--label-column", label)):
        if column not in names:
            raise FeatcacheError(f"{flag} {column}: the dataset has no such column; its columns are {', '.join(names)}")
    feature = features.get(label) if isinstance(features.get(label), dict) else {}
    return image, label, (list(feature["names"]) if feature.get("_type") == "ClassLabel" else None)


def _only(found: list[str], kind: str, names: list[str], flag: str) -> str:
    if len(found) == 1:
        return found[0]
    which = f"{len(found)} {kind} columns ({', '.join(found)})" if found else f"no {kind} column"
    raise FeatcacheError(f"the dataset has {which}: name the column with {flag}; its columns are {', '.join(names)}")


class ArrowImages:
    """Reads one image's bytes from Arrow files (memory-mapped) or Parquet files (a row group at a time), in
    whichever process asks: picklable, opened lazily."""

    def __init__(self, files: list[Path], column: str, name: str):
        self.files, self.column, self.name = [str(f) for f in files], column, name
        self._tables = None
        self._group = (None, None)  # (file, row group) -> its column, for Parquet

    def __getstate__(self):
        return {"files": self.files, "column": self.column, "name": self.name}

    def __setstate__(self, state):
        self.__init__([Path(f) for f in state["files"]], state["column"], state["name"])

    def blob(self, position: int) -> Blob:
        return _Cell(self, position)

    def __len__(self) -> int:
        return sum(rows for _, _, rows, _, _ in self._open())

    def _open(self):
        if self._tables is None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            tables = []  # (file, start row, rows, table or ParquetFile, row group starts)
            start = 0
            for f in self.files:
                with _readable(f):
                    if f.endswith(".parquet"):
                        pf = pq.ParquetFile(f)
                        groups = np.cumsum([0] + [pf.metadata.row_group(k).num_rows
                                                  for k in range(pf.num_row_groups)])
                        tables.append((f, start, int(groups[-1]), pf, groups))
                        start += int(groups[-1])
                    else:
                        table = _open_arrow(pa, pa.memory_map(f)).read_all()  # memory-mapped: no copy
                        tables.append((f, start, table.num_rows, table.column(self.column), None))
                        start += table.num_rows
            self._tables = tables
        return self._tables

    def value(self, position: int):
        for f, start, rows, source, groups in self._open():
            if start <= position < start + rows:
                row = position - start
                if groups is None:
                    return source[row].as_py()
                group = int(np.searchsorted(groups, row, side="right") - 1)
                if self._group[0] != (f, group):  # the workers read rows in order: one row group read per group
                    self._group = ((f, group), source.read_row_group(group, columns=[self.column]).column(0))
                return self._group[1][row - int(groups[group])].as_py()
        raise IndexError(position)


class _Cell(Blob):
    def __init__(self, images: ArrowImages, position: int):
        self.images, self.position = images, position

    def read(self):
        value = self.images.value(self.position)
        if isinstance(value, dict):  # the Image feature: {"bytes": ..., "path": ...}
            if value.get("bytes"):
                return value["bytes"]
            value = value.get("path")
        if isinstance(value, str) and value:
            return file_bytes(value)  # a regular file within the size limit: never a device or a FIFO
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        raise ValueError(f"holds {type(value).__name__}, not an image")

    def __str__(self):
        return f"{self.images.name} row {self.position}"


def _labels(files: list[Path], column: str) -> list:
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = []
    for f in files:
        with _readable(f):
            if f.suffix == ".parquet":
                values += pq.read_table(f, columns=[column]).column(0).to_pylist()
            else:
                with pa.memory_map(str(f)) as source:
                    values += _open_arrow(pa, source).read_all().column(column).to_pylist()
    return values


def _load(request: DataRequest) -> Dataset:
    need("pyarrow", "--dataset hf")
    found = _files(request)
    ours = {}
    if request.hf_splits:  # named by the user: train=A,val=B,test=C
        for part in request.hf_splits.split(","):
            mine, theirs = (x.strip() for x in part.split("=", 1))
            if theirs not in found:
                raise FeatcacheError(f"--hf-splits {mine}={theirs}: the dataset has no split {theirs!r} (its splits: "
                                     f"{', '.join(found)})")
            ours[mine] = (theirs, found[theirs])
    for theirs, files in ([] if request.hf_splits else found.items()):
        if theirs.lower() in OUR_SPLITS and OUR_SPLITS[theirs.lower()] not in ours:
            ours[OUR_SPLITS[theirs.lower()]] = (theirs, files)
    if "train" not in ours:
        raise FeatcacheError(f"the dataset has no train split (its splits: {', '.join(found)})")
    image, label, names = columns(_schema(ours["train"][1][0]), request)
    raw = {part: _labels(files, label) for part, (_, files) in ours.items()}
    if names is not None:  # a ClassLabel's -1 is its missing value
        raw = {part: [None if isinstance(v, int) and v < 0 else v for v in values] for part, values in raw.items()}
    where = request.hf_name or Path(request.data_dir).name
    names, numbers, notes = label_classes(raw, f"{where} (column {label!r})", names)
    parts = {}
    for part, (theirs, files) in ours.items():
        labels = numbers[part]
        index = np.arange(len(labels), dtype=np.int64)
        parts[part] = Split(labels=labels, index=index, files=Rows([(ArrowImages(files, image, f"{where}/{theirs}"),
                                                                      index)]))
    about = {"source": "Hugging Face datasets", "columns": {"image": image, "label": label},
             "splits": {part: theirs for part, (theirs, _) in ours.items()}}
    return Dataset(_key(request), tuple(names), official_splits(parts, request), about, tuple(notes))


def _key(request: DataRequest) -> str:
    name = request.hf_name or (Path(request.data_dir).resolve().name if request.data_dir else "none")
    return "hf-" + name.replace("/", "--") + (f"-{request.hf_config}" if request.hf_config else "")


def _identity(request: DataRequest) -> dict:
    files = _files(request)
    return {"source": "huggingface", "hf_name": request.hf_name, "hf_config": request.hf_config,
            **({"hf_splits": request.hf_splits} if request.hf_splits else {}),
            "image_column": request.image_column, "label_column": request.label_column,
            "files": {split: stat_identity(paths) for split, paths in sorted(files.items())},
            "test_fraction": request.test_fraction}


DATASETS.register("hf")(DatasetEntry(
    key=_key, identity=_identity, load=_load,
    about="a Hugging Face dataset: --data-dir a save_to_disk folder or Parquet / Arrow files, or --hf-name NAME",
))


def image_rows(folder: Path, column: str | None = None) -> list[Blob]:
    """Every row's image of every split of a saved HF dataset (labels not needed): what ``featcache predict``
    classifies when given such a folder."""
    out = []
    for split, files in _files(DataRequest(name="hf", data_dir=folder)).items():
        schema = _schema(files[0])
        image = column or _only([c for c in schema.names if _is_image(schema, _features(schema), c)], "Image",
                                list(schema.names), "--image-column")
        reader = ArrowImages(files, image, f"{Path(folder).name}/{split}")
        out += [reader.blob(k) for k in range(len(reader))]
    return out
