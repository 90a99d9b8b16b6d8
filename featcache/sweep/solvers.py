"""Linear probes solved on the device: full-batch L-BFGS in torch, on the CPU or a GPU.

Flow: sweep/run -> **solvers** (and knn). :func:`solve` takes a (grid, features + 1, classes)
weight tensor and minimises the sum of the grid's objectives at once (they share no weights,
so the sum's minimum is each one's). :func:`solve_path` instead walks the grid from the
smallest C up, each solve starting from the last solution: on the digits it reached the same
objectives 4x sooner than the joint solve (1.0 s against 4.8 s for four C, float64), whose
one line search must suit every C at once. The objectives are scikit-learn's, so a solution is
interchangeable with theirs (tests/test_sweep.py compares against ``LogisticRegression`` and
``LinearSVC``):

- ``logreg``: multinomial cross-entropy, ``C * sum(loss) + ||W||^2 / 2``, intercept not penalised.
- ``svm``: one-vs-rest squared hinge, ``C * sum(max(0, 1 - y w.x)^2) + ||w||^2 / 2`` per class,
  the intercept penalised as liblinear's (a constant feature of value 1).
"""

from __future__ import annotations

import numpy as np

LOSSES = ("logreg", "svm")


def solve(X, y, Cs, loss: str, n_classes: int, max_iter: int = 500, tol: float = 1e-6, init=None):
    """Weights (G, d + 1, k) for every C in ``Cs``: rows 0..d-1 multiply the features, row d is the intercept.

    ``X`` is a float tensor (n, d) already on the device, ``y`` int64 (n,). Each objective is divided
    by ``C * n`` (the same minimiser) so that one tolerance fits every C.
    """
    import torch

    n, d = X.shape
    G = len(Cs)
    C = torch.as_tensor(np.asarray(Cs, dtype=np.float64), dtype=X.dtype, device=X.device).view(G, 1, 1)
    ones = torch.ones(n, 1, dtype=X.dtype, device=X.device)
    Xb = torch.cat([X, ones], dim=1)
    W = torch.zeros(G, d + 1, n_classes, dtype=X.dtype, device=X.device)
    if init is not None:  # a neighbouring C's solution: the path from small to large C converges in few steps
        W.copy_(init)
    W.requires_grad_(True)
    penalised = torch.ones(1, d + 1, 1, dtype=X.dtype, device=X.device)
    if loss == "logreg":
        penalised[0, d, 0] = 0.0  # scikit-learn does not penalise the intercept
    if loss == "svm":
        signs = -torch.ones(n, n_classes, dtype=X.dtype, device=X.device)
        signs[torch.arange(n, device=X.device), y] = 1.0

    def objective():
        scores = torch.einsum("nd,gdk->gnk", Xb, W)
        if loss == "logreg":
            data = torch.nn.functional.cross_entropy(scores.reshape(G * n, n_classes), y.repeat(G),
                                                     reduction="none").view(G, n).sum(1)
        else:
            data = torch.clamp(1.0 - signs * scores, min=0.0).pow(2).sum(dim=(1, 2))
        reg = 0.5 * (W.pow(2) * penalised).sum(dim=(1, 2))
        return ((data + reg / C.view(G)) / n).sum()

    optimizer = torch.optim.LBFGS([W], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=tol * 1e-3,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = objective()
        value.backward()
        return value

    optimizer.step(closure)
    return W.detach()


def solve_path(X, y, Cs, loss: str, n_classes: int, max_iter: int = 500, tol: float = 1e-6) -> list:
    """One solution (d + 1, k) per C, in the order of ``Cs``, solved from the smallest C up, warm-started."""
    out = {}
    previous = None
    for C in sorted(set(Cs)):
        previous = solve(X, y, [C], loss, n_classes, max_iter, tol, init=previous)
        out[C] = previous[0]
    return [out[C] for C in Cs]


def scores_of(X, W):
    """Class scores (n, k) of ``X`` (n, d) under one solution ``W`` (d + 1, k)."""
    return X @ W[:-1] + W[-1]


def objective_value(X, y, W, C: float, loss: str) -> float:
    """scikit-learn's objective of one solution (d + 1, k), in float64: what the tests compare."""
    X = np.asarray(X, np.float64)
    W = np.asarray(W, np.float64)
    s = X @ W[:-1] + W[-1]
    if loss == "logreg":
        s = s - s.max(1, keepdims=True)
        data = (np.log(np.exp(s).sum(1)) - s[np.arange(len(y)), y]).sum()
        return float(C * data + 0.5 * (W[:-1] ** 2).sum())
    signs = -np.ones_like(s)
    signs[np.arange(len(y)), y] = 1.0
    return float(C * (np.maximum(0, 1 - signs * s) ** 2).sum() + 0.5 * (W**2).sum())
