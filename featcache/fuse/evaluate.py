"""Honest evaluation: stratified validation carved from train, choices made there, test once.

Flow: heads -> **evaluate** -> records. :func:`fit_select` never sees the test split: every
hyper-parameter candidate (and, for torch heads, the epoch kept by early stopping) is
judged on the validation rows, and :func:`score` is called once on test with the chosen,
already fitted head.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from featcache.errors import DataError, FeatcacheError
from featcache.fuse import logreg
from featcache.fuse.torch_stack import fit_stacked, stackable

MIN_VAL_PER_CLASS = 20  # fewer validation images of a class than this: choices made on it are noise
GRID_FLAGS = {"C": "--C", "weight_decay": "--weight-decay"}  # the flag that sets each grid
# How a torch head's candidates (weight decays) train: "auto" is _torch_way's rule; benchmarks/head_fit.py sets
# "one by one", "threads", "stacked" or "stacked, one thread" to compare them.
TORCH_FITS = "auto"


def validation_split(labels: np.ndarray, fraction: float, seed: int,
                     official: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train rows, validation rows) of the training split, each in order; where the dataset has
    its own validation split (``official``: a bool per row), those rows, and none carved."""
    from sklearn.model_selection import train_test_split

    if official is not None and official.any():
        return np.flatnonzero(~official), np.flatnonzero(official)
    if not 0 < fraction < 1:
        raise FeatcacheError(f"--val-fraction must lie between 0 and 1. Got {fraction} instead.")
    rows = np.arange(len(labels))
    n_val = max(1, int(round(fraction * len(labels))))
    if n_val >= len(labels):
        raise DataError(f"the training split holds {len(labels)} image(s): too few to hold out a validation "
                             f"share (--val-fraction {fraction}) and fit on the rest; raise --limit-train")
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 and n_val >= (counts > 0).sum() else None
    train, val = train_test_split(rows, test_size=n_val, random_state=seed, stratify=stratify)
    return np.sort(train), np.sort(val)


def cv_folds(labels: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``--cv K``: K stratified (fit rows, validation rows) pairs of the training split, shuffled by ``seed``; every
    training row (a dataset's own validation rows included) is validated on once. The test split is not touched."""
    from sklearn.model_selection import StratifiedKFold

    check_cv(labels, k)
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    return [(np.sort(fit), np.sort(val)) for fit, val in folds]


def check_cv(labels: np.ndarray, k: int) -> None:
    """One line before any work where ``--cv K`` cannot make K stratified folds of ``labels``."""
    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    if k > smallest:
        raise FeatcacheError(f"--cv {k} needs at least {k} training images of every class (one per fold); the smallest "
                             f"class has {smallest}: use --cv {max(2, smallest)} or fewer" if smallest >= 2 else
                             f"--cv needs at least 2 training images of every class; the smallest class has {smallest}")


@dataclass
class Selection:
    head: object  # fitted on the training rows with the chosen parameters
    params: dict
    val_accuracy: float
    candidates: list  # [{"params": ..., "val_accuracy": ...}] in the order tried
    fit_seconds: float
    fitted: list | None = None  # every candidate's fitted head, in the order tried (cross-validation scores them all)


def fit_select(entry, options, X_train, y_train, X_val, y_val, final: bool = True) -> Selection:
    """Fit every candidate on train, keep the best by validation accuracy (first wins ties).

    The validation accuracy recorded is the candidate's; an entry with ``final`` (the
    SVM) is then refitted on the same training rows with probabilities (not with ``final=False``:
    cross-validation's folds only score their candidates).
    """
    started = time.perf_counter()
    best, tried = None, []
    candidates = entry.candidates(options, len(X_train))

    def fit(params):
        head = entry.make(options, **params)
        if entry.torch:
            return head.fit(X_train, y_train, eval_set=(X_val, y_val))
        return head.fit(X_train, y_train)

    heads = [entry.make(options, **params) for params in candidates] if entry.torch else []
    way = _torch_way(options.device, heads) if heads and not hasattr(X_train, "chunks") else "one by one"
    if logreg.applies(entry, X_train, y_train):  # the sweep's solver, every C at once
        fitted = logreg.fit_every_c(options, candidates, X_train, y_train)
    elif way.startswith("stacked") and stackable(heads):
        with _torch_threads(1 if way == "stacked, one thread" else None):
            fitted = fit_stacked(heads, X_train, y_train, (X_val, y_val))
    else:
        fitted = _fit_all(fit, candidates, way == "threads")
    for params, head in zip(candidates, fitted):
        acc = float(np.mean(head.predict(X_val) == y_val))
        tried.append({"params": params, "val_accuracy": acc})
        if best is None or acc > best[2]:
            best = (head, params, acc)
    head, params, acc = best
    if entry.final is not None and final:  # refit only the chosen parameters in their final form
        head = entry.final(options, **params).fit(X_train, y_train)
    return Selection(head, params, acc, tried, time.perf_counter() - started, list(fitted))


def cross_validate(entry, options, blocks: list, y, folds: list, normalise) -> Selection:
    """``--cv K`` for one fusion and head: every candidate fitted on each fold's fit rows and scored on its held-out
    rows; the candidate with the best mean accuracy over the folds (the first of equals) is chosen, and fitted once
    more on every training row. ``blocks``: the fusion's taps on the training rows; ``normalise(blocks, fit_rows,
    rows_list)`` returns those rows' fused features, normalised on ``fit_rows``. A torch head, which has no
    validation rows left to stop on, trains for the median of the epochs the folds kept.

    The Selection's ``val_accuracy`` is that mean; each candidate carries its ``fold_accuracies``."""
    started = time.perf_counter()
    per_fold = []
    for fit_rows, val_rows in folds:
        X_fit, X_val = normalise(blocks, fit_rows, [fit_rows, val_rows])
        per_fold.append(fit_select(entry, options, X_fit, y[fit_rows], X_val, y[val_rows], final=False))
    accs = np.array([[c["val_accuracy"] for c in sel.candidates] for sel in per_fold])  # folds x candidates
    mean = accs.mean(axis=0)
    best = int(np.argmax(mean))
    params = per_fold[0].candidates[best]["params"]
    final_options = options
    epochs = [getattr(sel.fitted[best], "best_epoch_", None) for sel in per_fold]
    if entry.torch and all(isinstance(e, int) for e in epochs):
        from dataclasses import replace

        final_options = replace(options, epochs=max(1, int(np.median(epochs))))
    every = np.arange(len(y))
    [X_all] = normalise(blocks, every, [every])
    if logreg.applies(entry, X_all, y):
        [head] = logreg.fit_every_c(final_options, [params], X_all, y)
    else:
        head = (entry.final or entry.make)(final_options, **params).fit(X_all, y)
    candidates = [{"params": c["params"], "val_accuracy": float(mean[i]), "fold_accuracies": accs[:, i].tolist()}
                  for i, c in enumerate(per_fold[0].candidates)]
    return Selection(head, params, float(mean[best]), candidates, time.perf_counter() - started)


def small_validation(y_val, y_train=None, cv: int = 0) -> str | None:
    """The warning for a validation split too small to choose on, with the arithmetic of what would do, or None.

    ``y_train``: every training row's label (the rows a larger --val-fraction or ``--cv`` would validate on);
    ``cv``: the folds, when cross-validating (``y_val`` is then every training row)."""
    counts = np.unique(np.asarray(y_val), return_counts=True)[1]
    if counts.min() >= MIN_VAL_PER_CLASS:
        return None
    if cv:
        return (f"cross-validated over {cv} folds, every choice still rests on {counts.min()} images of the rarest "
                f"class (under {MIN_VAL_PER_CLASS}): choices made on it are noisy; more images of it would help")
    said = (f"the validation split holds {len(y_val)} images ({counts.min()} of the rarest class; under "
            f"{MIN_VAL_PER_CLASS} per class): choices made on it are noisy")
    if y_train is None:
        return said + "; use more images or a larger --val-fraction"
    rarest = int(np.unique(np.asarray(y_train), return_counts=True)[1].min())
    need = MIN_VAL_PER_CLASS / rarest
    if need < 1:
        larger = (f"{MIN_VAL_PER_CLASS} per class would take --val-fraction {need:.2f} of the {rarest} training images "
                  f"of the rarest class{', leaving too few to train on' if need > 0.5 else ''}")
    else:
        larger = (f"{MIN_VAL_PER_CLASS} per class would take {'all' if need == 1 else 'more than all'} {rarest} "
                  f"training images of the rarest class")
    if rarest < 2:
        return f"{said}; {larger}"
    k = min(5, rarest)
    return f"{said}; {larger}; --cv {k} validates on every training image instead ({rarest} of the rarest class, " \
           f"over {k} folds)"


def selection_warnings(head_name: str, selection: Selection, epochs: int | None = None) -> list[str]:
    """One line per choice that validation could not make well: a value at the edge of its grid,
    or a torch head whose validation loss still improved at its last epoch."""
    out = []
    chosen = selection.params
    for key, flag in GRID_FLAGS.items():
        if not isinstance(chosen.get(key), (int, float)):
            continue
        others = {k: v for k, v in chosen.items() if k != key}
        grid = sorted({c["params"][key] for c in selection.candidates
                       if {k: v for k, v in c["params"].items() if k != key} == others})
        value = chosen[key]
        if len(grid) < 2 or (key == "weight_decay" and value == grid[0] == 0):  # no decay: nothing below
            continue
        if value in (grid[0], grid[-1]):
            top = value == grid[-1]
            near = grid[-2] if top else grid[1]
            step = (value / near if top else near / value) if near and value else 10.0  # the grid's own spacing
            beyond = [value * step, value * step**2] if top else [value / step, value / step**2]
            wider = ",".join(f"{g:g}" for g in sorted({*grid, *beyond}))
            out.append(f"{head_name} chose {key}={value:g}, the {'largest' if top else 'smallest'} of its grid "
                       f"({', '.join(f'{g:g}' for g in grid)}): the best may lie beyond; widen it, e.g. {flag} {wider}")
    best_epoch = getattr(selection.head, "best_epoch_", None)
    if epochs is not None and best_epoch == epochs:
        out.append(f"{head_name} kept its last epoch ({epochs}): the validation loss was still falling, "
                   f"so it never stopped early; raise --epochs")
    return out


def _torch_way(device: str, heads: list) -> str:
    """How a torch head's candidates train on ``device`` (``TORCH_FITS``): on a GPU stacked as one network (k times
    fewer kernel launches; unmeasured there: gpu.sh's head_fit step); on the CPU the linear head stacked in one
    thread, a head with hidden layers side by side in threads, one thread each. benchmarks/head_fit.py on 2 CPU
    cores (benchmarks/RESULTS.md): the linear head stacked in one thread took 0.44 / 0.27 s against the threads'
    0.67 / 0.45 s on a quiet machine (1,836 / 544 columns), 0.69 / 0.46 s against 1.07 / 0.90 s on a busy one; the
    mlp stacked in one thread took 1.7x the threads' time on a quiet machine, in two threads 2.8x on a busy one."""
    if TORCH_FITS != "auto":
        return TORCH_FITS
    if device != "cpu":
        return "stacked"
    return "threads" if heads[0].hidden else "stacked, one thread"


@contextmanager
def _torch_threads(n: int | None):
    """torch's intra-op threads set to ``n`` for the block (None: left as they are)."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit_all(fit, candidates: list, concurrent: bool):
    """``fit`` of every candidate, in order; torch heads on the CPU side by side, one thread each.

    A small head's matrix products gain little from a second thread, and its threads stall
    whenever another process takes a core (measured in benchmarks/RESULTS.md): one thread per
    candidate, candidates concurrently, is faster on a quiet machine and far faster on a busy one.
    """
    if not concurrent or len(candidates) < 2:
        return [fit(p) for p in candidates]
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from featcache.extraction.config import available_cores

    def one_thread(params):
        torch.set_num_threads(1)  # OpenMP keeps the count per thread: set it in the worker
        return fit(params)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=min(len(candidates), available_cores())) as pool:
            return list(pool.map(one_thread, candidates))
    finally:
        torch.set_num_threads(threads)


def score(head, X_test, y_test, classes) -> dict:
    """All test metrics of a fitted head, computed once."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    started = time.perf_counter()
    proba = head.predict_proba(X_test)
    predict_seconds = time.perf_counter() - started
    labels = np.arange(len(classes))
    pred = np.asarray(head.classes_)[proba.argmax(axis=1)]
    precision, recall, _, support = precision_recall_fscore_support(
        y_test, pred, labels=labels, zero_division=0
    )
    metrics = {
        "accuracy": float(accuracy_score(y_test, pred)),
        "macro_f1": float(f1_score(y_test, pred, labels=labels, average="macro", zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(y_test, pred)),
        "per_class": {
            str(c): {"precision": float(p), "recall": float(r), "support": int(s)}
            for c, p, r, s in zip(classes, precision, recall, support)
        },
        "confusion_matrix": confusion_matrix(y_test, pred, labels=labels).tolist(),
        "predict_seconds": predict_seconds,
        "predictions": pred.tolist(),  # per test row, for the report's prediction grid
    }
    if len(classes) >= 5:
        full = np.zeros((len(proba), len(classes)))
        full[:, np.asarray(head.classes_)] = proba
        metrics["top5_accuracy"] = float(top_k_accuracy_score(y_test, full, k=5, labels=labels))
    return metrics
