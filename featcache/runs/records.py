"""Run records: one folder per trained head, and the table that compares them.

Flow: fuse / finetuning -> **records** -> reporting. A run folder holds ``record.json`` (config, cache
fingerprints, chosen hyper-parameters, metrics, per-epoch curves, timings, library
versions) and the trained head in formats that run no code when read (see
:mod:`featcache.fuse.saved`). A folder is written under a temporary name and renamed when
complete, so a run folder is never half-written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from featcache._version import __version__
from featcache.data.datasets import DataRequest
from featcache.errors import FeatcacheError, closest
from featcache.extraction.config import ExtractConfig

RECORD = "record.json"
FIELD_TYPES = {"taps": list, "head": str, "dim": int, "classes": list, "config": dict, "rows": dict, "selection": dict,
               "metrics": dict, "timings": dict, "versions": dict, "caches": dict, "warnings": list, "run": str,
               "request": str}
KIND_WORDS = {list: "a list", str: "a string", int: "a whole number", dict: "an object"}
SCHEMA = 1  # version of record.json; featcache 0.1.0 wrote version 1 without the field
KINDS = ("frozen", "finetuned")


def library_versions() -> dict:
    """The versions a run was made with. torchvision's is read from its ``version.py`` as text where it is not
    imported yet: importing it for the number took 2.8 s of a frozen run that never builds a network."""
    import h5py
    import numpy
    import sklearn
    import torch

    return {"featcache": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": _torchvision_version(), "scikit-learn": sklearn.__version__,
            "numpy": numpy.__version__, "h5py": h5py.__version__}


def _torchvision_version() -> str:
    import importlib.util
    import sys

    if "torchvision" not in sys.modules:
        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
            found = re.search(r"^__version__ = ['\"]([^'\"]+)['\"]", path.read_text(), re.M) if path.is_file() else None
            if found:
                return found.group(1)
    import torchvision

    return torchvision.__version__


@dataclass(frozen=True)
class RunRecord:
    """What a run folder's ``record.json`` holds: the one schema, written and read in this module alone.

    Attributes mirror the JSON keys; ``record.metrics`` reads as the file does. ``config``
    holds the request (dataset, backbones, weights, preprocessing, head options),
    ``selection`` what validation chose, ``curves`` the per-epoch history of torch heads.
    """

    kind: str  # "frozen" (a head on cached taps) or "finetuned"
    taps: list
    head: str
    dim: int  # width of the fused features
    classes: list
    config: dict
    rows: dict  # train / val / test row counts
    selection: dict
    curves: dict | None
    metrics: dict
    timings: dict
    versions: dict
    caches: dict = field(default_factory=dict)  # backbone -> cache path and fingerprint (frozen runs)
    test_index: list | None = None  # source positions of the scored test rows
    run: str = ""  # the folder's name, set when the run is saved
    request: str = ""  # hash of what the result depends on: an identical request is served from this run
    warnings: list = field(default_factory=list)  # choices validation could not make well, one line each
    schema: int = SCHEMA

    def __post_init__(self):
        if self.kind not in KINDS:
            raise FeatcacheError(f"a run record's kind must be one of {', '.join(KINDS)}. Got {self.kind!r} instead.")
        for name, kind in FIELD_TYPES.items():  # a record from elsewhere is checked before anything reads it
            value = getattr(self, name)
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                raise FeatcacheError(f"a run record's {name} must be {KIND_WORDS[kind]}. Got {type(value).__name__} "
                                     f"instead.")
        if not all(isinstance(t, str) for t in self.taps) or not all(isinstance(c, str) for c in self.classes):
            raise FeatcacheError("a run record's taps and classes must be lists of names")

    @property
    def finetuned(self) -> bool:
        return self.kind == "finetuned"

    def __getitem__(self, key: str):
        return getattr(self, key)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=_json_default)

    @classmethod
    def from_json(cls, data: dict, source: Path) -> RunRecord:
        """A record read from ``source``; an older schema is upgraded here, a newer one refused."""
        version = data.get("schema", 1)
        if not isinstance(version, int) or version > SCHEMA:
            raise FeatcacheError(f"{source} was written by a newer featcache (record schema {version}, this one "
                                 f"reads up to {SCHEMA}): upgrade featcache to read it")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise FeatcacheError(f"{source} is not a complete run record: {', '.join(missing)} missing")
        return cls(**{k: v for k, v in data.items() if k in names})


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")[:80]


def save_run(runs_dir: Path, label: str, record: RunRecord, write_model: Callable[[Path], None]) -> Path:
    """Write a complete run folder ``runs_dir/<time>-<label>`` and return its path.

    ``write_model(folder)`` writes the trained model's files (the stage that trained it knows how:
    :func:`featcache.fuse.saved.save_head`); the record is written beside them.
    """
    runs_dir = Path(runs_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{_slug(label)}"
    final, n = runs_dir / name, 1
    while final.exists():
        n += 1
        final = runs_dir / f"{name}-{n}"
    tmp = runs_dir / f".{final.name}.tmp"
    try:
        tmp.mkdir(parents=True)
        write_model(tmp)
        (tmp / RECORD).write_text(dataclasses.replace(record, run=final.name).to_json())
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FeatcacheError(f"cannot write run folder in {runs_dir}: {exc.strerror or exc}; choose another --runs-dir") from exc
    return final


def result_line(run: Path, record: RunRecord) -> str:
    """The line fuse-train and finetune print for each run they write."""
    return (f"{Path(run).name}: val acc {record.selection['val_accuracy']:.4f}  test acc "
            f"{record.metrics['accuracy']:.4f}  macro-F1 {record.metrics['macro_f1']:.4f}  "
            f"fit {record.timings['fit_seconds']:.1f} s")


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a run record")


def load_record(folder: Path) -> RunRecord:
    folder = Path(folder)
    path = folder / RECORD
    if not path.is_file():
        raise FeatcacheError(f"{folder} is not a run folder (no {RECORD}): list runs with featcache runs")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise FeatcacheError(f"{path} is not a run record (not text: damaged, or another kind of file)") from None
    except json.JSONDecodeError as exc:
        raise FeatcacheError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise FeatcacheError(f"{path} is not a run record (a JSON object)")
    return RunRecord.from_json(data, path)


def record_features(record: RunRecord, device: str = "cpu") -> ExtractConfig:
    """The ExtractConfig (dataset, backbones, weights, preprocessing) a run was trained with."""
    return ExtractConfig.from_record(record.config, device)


def record_request(record: RunRecord) -> DataRequest:
    """The DataRequest (dataset, subsets, split seed) a run was trained on."""
    return record_features(record).data


def resolve_run(run: str, runs_dir: Path) -> Path:
    """A run given as a folder path, or as a name inside ``runs_dir`` or one of its sub-folders."""
    path = Path(run)
    if not path.exists():
        inside = Path(runs_dir) / run
        named = [p for p in run_folders(runs_dir) if p.name == path.name]
        if (inside / RECORD).is_file():
            path = inside
        elif len(named) == 1:  # one folder down, where a pipeline keeps its runs
            path = named[0]
        elif not named and not (path / RECORD).is_file():
            guess = closest(path.name, [p.name for p in run_folders(runs_dir)])
            if guess:
                raise FeatcacheError(f"no run {run} in {runs_dir}; did you mean {guess}? (featcache runs lists them)")
    load_record(path)
    return path


def run_folders(runs_dir: Path) -> list[Path]:
    """Every run folder in ``runs_dir`` and one level down (a pipeline keeps its runs in runs/<name>/)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    visible = [p for p in sorted(runs_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    found = []
    for folder in visible:
        if (folder / RECORD).is_file():
            found.append(folder)
        else:
            found += [p for p in sorted(folder.iterdir()) if not p.name.startswith(".") and (p / RECORD).is_file()]
    return found


def list_records(runs_dir: Path, unreadable: list | None = None) -> list[RunRecord]:
    """The records of every run in ``runs_dir``; given ``unreadable``, a run whose record cannot be read is left
    out and added there as (folder, why) instead of stopping the listing."""
    records = []
    for folder in run_folders(runs_dir):
        try:
            records.append(load_record(folder))
        except FeatcacheError as exc:
            if unreadable is None:
                raise
            unreadable.append((folder, str(exc)))
    return records


def no_runs(runs_dir: Path, hint: str) -> FeatcacheError:
    """The error for a runs folder with no run in it or one level down, naming where it looked."""
    return FeatcacheError(f"no runs in {runs_dir} or its sub-folders: {hint}")


def pipeline_runs(runs_dir: Path, pipeline: str | None) -> Path:
    """``runs_dir``, or a pipeline's own folder of runs inside it (``--pipeline NAME``)."""
    if pipeline is None:
        return Path(runs_dir)
    folder = Path(runs_dir) / pipeline
    if not folder.is_dir():
        names = sorted({p.parent.name for p in run_folders(runs_dir) if p.parent != Path(runs_dir)})
        raise FeatcacheError(f"no runs of pipeline {pipeline!r} in {runs_dir}"
                             + (f" (pipelines there: {', '.join(names)})" if names else "")
                             + ": featcache run PIPELINE.toml writes them")
    return folder
