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

from featcache.registry import Registry
from featcache.runs.records import load_record

# kind -> (run_dir, record, files, device, batch_size) -> (probabilities (N, K), class names of the K columns)
PREDICTORS: Registry = Registry("run kind")


def register_predictor(kind: str) -> Callable:
    return PREDICTORS.register(kind)


def predict_files(run_dir: Path, files: list[Path], device: str = "auto", batch_size: int = 32):
    """[(file, label, probability)] for each image file."""
    record = load_record(run_dir)
    proba, classes = PREDICTORS.lookup(record.kind)(run_dir, record, files, device, batch_size)
    best = proba.argmax(axis=1)
    return [(f, classes[int(k)], float(proba[i, k])) for i, (f, k) in enumerate(zip(files, best))]
