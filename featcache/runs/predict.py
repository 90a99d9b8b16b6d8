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


def check_output(path: Path) -> Path:
    """``--output``'s file, if featcache can write its kind: .csv or .parquet."""
    path = Path(path)
    if path.suffix not in (".csv", ".parquet"):
        raise FeatcacheError(f"--output {path}: predictions are written as .csv or .parquet; name the file so")
    return path


def write_predictions(path: Path, predictions: list) -> Path:
    """The predictions as a table (file, rank, label, probability), CSV or Parquet by ``path``'s suffix."""
    import pandas as pd

    rows = []
    for file, *rest in predictions:
        ranked = rest[0] if len(rest) == 1 else [tuple(rest)]
        rows += [{"file": str(file), "rank": r, "label": label, "probability": p}
                 for r, (label, p) in enumerate(ranked, start=1)]
    table = pd.DataFrame(rows, columns=["file", "rank", "label", "probability"])
    path = check_output(path)
    if path.suffix == ".csv":
        atomic_write(path, table.to_csv(index=False))
    else:
        try:
            atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))
        except ImportError:
            raise FeatcacheError(f"--output {path}: Parquet needs pyarrow (pip install pyarrow); or write .csv") from None
    return path
