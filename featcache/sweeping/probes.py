"""One combination of taps, one head: hyper-parameters chosen on validation, the chosen model scored on test once.

Flow: sweep/run -> **probes** -> solvers / knn / the fuse-train heads. Inputs are device tensors
of features already standardised per tap on the training rows.
"""

from __future__ import annotations

import time

import numpy as np

from featcache.fuse.evaluate import fit_select
from featcache.fuse.heads import C_GRID, HEADS, SVM_C_GRID, HeadOptions
from featcache.sweeping.knn import KS, neighbours, vote
from featcache.solvers.lanes import solve_many
from featcache.solvers.path import scores_of, solve_path


def batched() -> list[str]:
    """The heads whose fits :func:`presolve` makes for many combinations at once."""
    return [name for name, entry in HEADS.items() if entry.sweep == "batched"]


def presolve(head: str, problems: list, y, n_classes: int, options: HeadOptions, rotations: bool = False) -> list:
    """For a :func:`batched` head: every problem's fits (a problem: its taps' fit blocks, side by side), solved
    together. Returns per problem ``(solved, rotated)``: its fits with their share of the seconds, for
    :func:`probe`'s ``solved``; with ``rotations``, the rotation of its features to reuse for its svm
    (:func:`probe`'s ``rotated``), or None."""
    started = time.perf_counter()
    kept = [] if rotations else None
    solutions = solve_many(problems, y, grid_of(head, options), n_classes, rotations=kept)
    share = (time.perf_counter() - started) / max(len(problems), 1)
    return [((s, share), kept[i] if rotations else None) for i, s in enumerate(solutions)]


def grid_of(head: str, options: HeadOptions) -> list:
    """The C's a linear head tries."""
    return list(options.grid.get("C", C_GRID if head == "logreg" else SVM_C_GRID))


def probe(head: str, X: dict, y: dict, n_classes: int, options: HeadOptions, solved=None, rotated=None,
          every: bool = False) -> dict:
    """``X`` / ``y``: {"fit", "val", "test"} -> tensors. Returns the chosen parameters, the validation accuracy
    of every candidate, test accuracy and macro-F1 of the chosen one, and the seconds it took (with
    ``solved``'s share: :func:`presolve`'s output for this combination; ``rotated``: its rotation, for the
    svm). Without a "test" entry (choosing taps) nothing is scored on test.

    ``every`` (a fold of ``--cv``): each candidate is ``[params, validation accuracy, test accuracy, macro-F1]``,
    so that the candidate chosen on the mean over the folds has its test figures (the fold alone chooses nothing)."""
    started = time.perf_counter()
    if solved is not None:
        started -= solved[1]
    way = HEADS.lookup(head).sweep
    if way in ("batched", "path"):
        Cs = grid_of(head, options)
        if solved is not None:
            solutions = solved[0]
        elif way == "batched":
            [solutions] = solve_many([[X["fit"]]], y["fit"], Cs, n_classes)
        else:
            solutions = solve_path(X["fit"], y["fit"], Cs, head, n_classes, rotated=rotated)
        accs = [_accuracy(scores_of(X["val"], W), y["val"]) for W in solutions]
        best = int(np.argmax(accs))  # the first of equals: the smallest C listed first wins ties
        predicted = scores_of(X["test"], solutions[best]).argmax(1) if "test" in X else None
        grid, chosen = [{"C": c} for c in Cs], {"C": Cs[best]}
        if every and "test" in X:
            everyone = [scores_of(X["test"], W).argmax(1) for W in solutions]
    elif way == "neighbours":
        ks = [k for k in KS if k <= len(X["fit"])] or [len(X["fit"])]
        sims, idx = neighbours(X["fit"], X["val"], max(ks))
        accs = [_accuracy(vote(sims, idx, y["fit"], k, n_classes), y["val"]) for k in ks]
        best = int(np.argmax(accs))
        grid, chosen = [{"k": k} for k in ks], {"k": ks[best]}
        predicted = None
        if "test" in X:
            sims, idx = neighbours(X["fit"], X["test"], max(ks) if every else ks[best])
            predicted = vote(sims, idx, y["fit"], ks[best], n_classes).argmax(1)
            if every:
                everyone = [vote(sims, idx, y["fit"], k, n_classes).argmax(1) for k in ks]
    else:  # "fit" (linear, mlp, any head fuse-train can fit): its candidates side by side
        numpy = {part: X[part].float().cpu().numpy() for part in X}
        labels = {part: y[part].cpu().numpy() for part in y}
        selection = fit_select(HEADS.lookup(head), options, numpy["fit"], labels["fit"], numpy["val"], labels["val"])
        accs = [c["val_accuracy"] for c in selection.candidates]
        grid = [c["params"] for c in selection.candidates]
        chosen = selection.params
        predicted = selection.head.predict(numpy["test"]) if "test" in X else None
        if every and "test" in X:
            everyone = [head.predict(numpy["test"]) for head in selection.fitted]
    out = {"chosen": chosen, "val_acc": float(max(accs)), "candidates": [[g, a] for g, a in zip(grid, accs)]}
    if predicted is None:
        return {**out, "fit_s": time.perf_counter() - started}
    truth = y["test"].cpu().numpy()

    def figures(predicted) -> tuple[float, float]:
        predicted = np.asarray(predicted.cpu() if hasattr(predicted, "cpu") else predicted)
        return float(np.mean(predicted == truth)), macro_f1(truth, predicted, n_classes)

    if every:
        out["candidates"] = [[g, a, *figures(p)] for g, a, p in zip(grid, accs, everyone)]
    test_acc, f1 = figures(predicted)
    return {**out, "test_acc": test_acc, "macro_f1": f1, "fit_s": time.perf_counter() - started}


def macro_f1(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> float:
    """scikit-learn's ``f1_score(average="macro", labels=range(n_classes), zero_division=0)`` from one confusion
    count: ``2 tp / (2 tp + fp + fn)`` per class, 0 where a class is neither true nor predicted. A ``--cv`` fold
    scores every candidate on test, thousands of calls in a sweep, where scikit-learn's checks took most of the time."""
    counts = np.bincount(np.asarray(truth, np.int64) * n_classes + np.asarray(predicted, np.int64),
                         minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    both = counts.sum(0) + counts.sum(1)  # predicted + true = 2 tp + fp + fn
    return float(np.mean(np.divide(2 * np.diag(counts), both, out=np.zeros(n_classes), where=both > 0)))


def _accuracy(scores, labels) -> float:
    return int((scores.argmax(1) == labels).sum()) / len(labels)  # exact, as fuse-train's NumPy mean
