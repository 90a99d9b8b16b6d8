"""One combination of taps, one head: hyper-parameters chosen on validation, the chosen model scored on test once.

Flow: sweep/run -> **probes** -> solvers / knn / the fuse-train heads. Inputs are device tensors
of features already standardised per tap on the training rows.
"""

from __future__ import annotations

import time

import numpy as np

from featcache.fuse.evaluate import fit_select
from featcache.fuse.heads import C_GRID, HEADS, SVM_C_GRID, HeadOptions
from featcache.sweep.knn import KS, neighbours, vote
from featcache.sweep.solvers import scores_of, solve_path


def probe(head: str, X: dict, y: dict, n_classes: int, options: HeadOptions) -> dict:
    """``X`` / ``y``: {"fit", "val", "test"} -> tensors. Returns the chosen parameters, the validation accuracy
    of every candidate, test accuracy and macro-F1 of the chosen one, and the seconds it took. Without a
    "test" entry (choosing taps) nothing is scored on test."""
    from sklearn.metrics import f1_score

    started = time.perf_counter()
    if head in ("logreg", "svm"):
        Cs = list(options.grid.get("C", C_GRID if head == "logreg" else SVM_C_GRID))
        solutions = solve_path(X["fit"], y["fit"], Cs, head, n_classes)
        accs = [_accuracy(scores_of(X["val"], W), y["val"]) for W in solutions]
        best = int(np.argmax(accs))  # the first of equals: the smallest C listed first wins ties
        predicted = scores_of(X["test"], solutions[best]).argmax(1) if "test" in X else None
        grid, chosen = [{"C": c} for c in Cs], {"C": Cs[best]}
    elif head == "knn":
        ks = [k for k in KS if k <= len(X["fit"])] or [len(X["fit"])]
        sims, idx = neighbours(X["fit"], X["val"], max(ks))
        accs = [_accuracy(vote(sims, idx, y["fit"], k, n_classes), y["val"]) for k in ks]
        best = int(np.argmax(accs))
        grid, chosen = [{"k": k} for k in ks], {"k": ks[best]}
        predicted = None
        if "test" in X:
            sims, idx = neighbours(X["fit"], X["test"], ks[best])
            predicted = vote(sims, idx, y["fit"], ks[best], n_classes).argmax(1)
    else:  # linear, mlp: fuse-train's own heads, their candidates side by side
        numpy = {part: X[part].float().cpu().numpy() for part in X}
        labels = {part: y[part].cpu().numpy() for part in y}
        selection = fit_select(HEADS.lookup(head), options, numpy["fit"], labels["fit"], numpy["val"], labels["val"])
        accs = [c["val_accuracy"] for c in selection.candidates]
        grid = [c["params"] for c in selection.candidates]
        chosen = selection.params
        predicted = selection.head.predict(numpy["test"]) if "test" in X else None
    out = {"chosen": chosen, "val_acc": float(max(accs)), "candidates": [[g, a] for g, a in zip(grid, accs)]}
    if predicted is None:
        return {**out, "fit_s": time.perf_counter() - started}
    truth = y["test"].cpu().numpy()
    predicted = np.asarray(predicted.cpu() if hasattr(predicted, "cpu") else predicted)
    return {**out, "test_acc": float(np.mean(predicted == truth)),
            "macro_f1": float(f1_score(truth, predicted, average="macro", labels=np.arange(n_classes), zero_division=0)),
            "fit_s": time.perf_counter() - started}


def _accuracy(scores, labels) -> float:
    return int((scores.argmax(1) == labels).sum()) / len(labels)  # exact, as fuse-train's NumPy mean
