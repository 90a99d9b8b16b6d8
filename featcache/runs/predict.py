"""Classify new image files with a run: the run's own kind rebuilds its model.

Inside runs (records -> **predict**), below the stages that write runs: it knows no model. Each
run kind registers how it turns image files into class probabilities (``PREDICTORS``: fuse
registers ``frozen`` — the backbones as extracted, the fitted normaliser and head; finetuning
registers ``finetuned`` — the model rebuilt from ``model.safetensors``). The API and the command
line import every stage, so both kinds are there when they call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError
from featcache.files import atomic_write
from featcache.registry import Registry
from featcache.runs.records import load_record

# kind -> (run_dir, record, files, device, batch_size) -> (probabilities (N, K), class names of the K columns)
PREDICTORS: Registry = Registry("run kind")


def register_predictor(kind: str) -> Callable:
    return PREDICTORS.register(kind)


def predict_files(run_dir: Path, files: list[Path], device: str = "auto", batch_size: int = 32, top_k: int = 1):
    """[(file, label, probability)] for each image file; with ``top_k`` > 1, its ``top_k`` most probable
    classes, best first, as [(file, [(label, probability), ...])]."""
    record = load_record(run_dir)
    proba, classes = PREDICTORS.lookup(record.kind)(run_dir, record, files, device, batch_size)
    order = np.argsort(-proba, axis=1, kind="stable")[:, :top_k]
    if top_k == 1:
        return [(f, classes[int(k)], float(proba[i, k])) for i, (f, k) in enumerate(zip(files, order[:, 0]))]
    return [(f, [(classes[int(k)], float(proba[i, k])) for k in ranked]) for i, (f, ranked) in enumerate(zip(files, order))]


COLUMNS = ["file", "rank", "label", "probability"]


def check_output(path: Path, force: bool = False) -> Path:
    """``--output``'s file, if featcache can write its kind (.csv or .parquet) and may replace what is there:
    nothing, a predictions table featcache wrote, or anything with ``force`` (a manifest given as the images
    is never lost to a typo)."""
    path = Path(path)
    if path.suffix not in (".csv", ".parquet"):
        raise FeatcacheError(f"--output {path}: predictions are written as .csv or .parquet; name the file so")
    if path.is_dir():
        raise FeatcacheError(f"--output {path} is a folder: give a file name")
    if path.exists() and not force and not _ours(path):
        raise FeatcacheError(f"--output {path} exists and is not a predictions table featcache wrote: choose another "
                             f"file, or pass --force to replace it")
    return path


def _ours(path: Path) -> bool:
    """A predictions table: its columns are exactly file, rank, label, probability."""
    if not path.is_file():
        return False
    try:
        if path.suffix == ".csv":
            with open(path, "rb") as f:
                return f.readline(4096).decode("utf-8", "replace").strip() == ",".join(COLUMNS)
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names) == COLUMNS
    except Exception:  # unreadable, or no pyarrow: not provably ours
        return False


def prediction_table(predictions: list):
    """The predictions as a DataFrame (file, rank, label, probability): what the API returns and --output writes."""
    import pandas as pd

    rows = []
    for file, *rest in predictions:
        ranked = rest[0] if len(rest) == 1 else [tuple(rest)]
        rows += [{"file": str(file), "rank": r, "label": label, "probability": p}
                 for r, (label, p) in enumerate(ranked, start=1)]
    return pd.DataFrame(rows, columns=COLUMNS)


def write_predictions(path: Path, predictions: list) -> Path:
    """The predictions as a table (file, rank, label, probability), CSV or Parquet by ``path``'s suffix."""
    table = prediction_table(predictions)
    path = Path(path)
    try:
        if path.suffix == ".csv":
            atomic_write(path, table.to_csv(index=False))
        else:
            atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))
    except ImportError:
        raise FeatcacheError(f"--output {path}: Parquet needs pyarrow (pip install pyarrow); or write .csv") from None
    except OSError as exc:
        raise FeatcacheError(f"cannot write --output {path}: {exc.strerror or exc}") from None
    return path
