"""Linear probes solved on the device: full-batch L-BFGS in torch, on the CPU or a GPU.

Flow: sweep/run -> probes -> **solvers** (and lanes, knn). :func:`solve_path` walks the grid of C
from the smallest up, each solve starting from the last solution: the svm's way. The logistic
regressions of the sweep go through :mod:`featcache.solvers.lanes` instead, every C of many
combinations at once, on :func:`rotate`'s features. :func:`solve` takes a (grid, features + 1,
classes) weight tensor and minimises the sum of the grid's objectives with ``torch.optim.LBFGS``
(they share no weights, so the sum's minimum is each one's); the path calls it one C at a time,
where one line search for every C at once had been 4x slower (1.0 s against 4.8 s for four C).
The objectives are scikit-learn's, so a solution is interchangeable with theirs (tests/test_sweep.py
compares against ``LogisticRegression`` and ``LinearSVC``):

- ``logreg``: multinomial cross-entropy, ``C * sum(loss) + ||W||^2 / 2``, intercept not penalised.
- ``svm``: one-vs-rest squared hinge, ``C * sum(max(0, 1 - y w.x)^2) + ||w||^2 / 2`` per class,
  the intercept penalised as liblinear's (a constant feature of value 1), by exact Newton steps
  (:mod:`featcache.solvers.hinge`, :mod:`featcache.solvers.hinge_rows`) where their Hessians fit, else by L-BFGS.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict

import numpy as np

from featcache.solvers import hinge, hinge_rows

LOSSES = ("logreg", "svm")


def rotate(X):
    """``(Z, V, S)`` with ``X = Z @ V.T`` exactly, ``V`` orthonormal columns and ``Z.T @ Z = diag(S**2)``;
    ``Z`` is None when rows are at least as many as features (``V`` is then square: :func:`solve` takes
    it as ``basis``). The last result is kept for the next call on the same tensor (the same
    combination's other head).

    Both objectives penalise ``|w|^2`` and see the features only through ``X @ w``, so their
    solutions lie in the row space of ``X`` and are unchanged by rotating it: solving on ``Z``
    and mapping back ``w = V @ u`` gives the same weights. With fewer rows than features
    (1,000 images, 3,328 columns) ``Z`` has only as many columns as rows, and its orthogonal
    columns let a diagonal rescaling (:func:`solve`'s ``scale``) precondition L-BFGS.
    """
    import torch

    global _ROTATED
    if _ROTATED is not None and _ROTATED[0]() is X:  # logreg and svm of one combination share it
        return _ROTATED[1]
    seen = _content(X)
    if _ROTATED is not None and _ROTATED[2] == seen:  # the same numbers again: a sweep's kept run refits its row
        _ROTATED = (weakref.ref(X), _ROTATED[1], seen)
        return _ROTATED[1]
    n, d = X.shape
    if n < d:  # through the rows' Gram matrix: an n-square eigenproblem, 15x faster than the SVD
        # in float64 (V = X'U / S divides by small S), a block of columns at a time: a whole float64 copy
        # of X would take 4.8 GB at 20,000 x 30,000
        blocks = [(lo, min(lo + COLUMN_BLOCK, d)) for lo in range(0, d, COLUMN_BLOCK)]
        gram = torch.zeros(n, n, dtype=torch.float64, device=X.device)
        for lo, hi in blocks:
            part = X[:, lo:hi].double()
            gram += part @ part.T
        S, U = row_space(gram)
        Z = U * S
        V = torch.cat([((X[:, lo:hi].double().T @ U) / S).to(X.dtype) for lo, hi in blocks])
    else:  # through the features' Gram matrix, d-square; its n-long products in X's precision (45,000 rows:
        # 2 s against 8 s in float64; by blocks, hinge.gram, 0.91-0.94 s against 1.43-1.45 s whole), its
        # eigenvectors in float64, so V stays orthonormal
        S2, V = torch.linalg.eigh(hinge.gram(X))  # its blocks on and above the diagonal only
        S, Z = S2.clamp(min=0).sqrt(), None  # no rotated copy: solve() applies V to the weights instead
    # a weak reference: the cache must not keep a sweep's features alive after it (323 MB at CIFAR size)
    _ROTATED = (weakref.ref(X), (None if Z is None else Z.to(X.dtype), V.to(X.dtype), S.to(X.dtype)), seen)
    return _ROTATED[1]


_ROTATED = None


def _content(X) -> tuple:
    """What tells ``X``'s numbers apart from any other's without keeping them: its shape, type, device and its
    products with two fixed random vectors (a few ms at 45,000 x 1,792). The same numbers in the same layout give
    the same bytes; a difference anywhere changes them but for an exact cancellation in every row."""
    import torch

    probe = torch.rand(X.shape[1], 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return tuple(X.shape), str(X.dtype), str(X.device), (X @ probe.to(X)).cpu().numpy().tobytes()


def row_space(gram):
    """``(S, U)`` of the rows' Gram matrix ``X X' = U S^2 U'`` (float64), without its null directions:
    standardised rows span n - 1 dimensions at most."""
    import torch

    S2, U = torch.linalg.eigh(gram)
    keep = S2 > S2.max() * 1e-12
    return S2[keep].sqrt(), U[:, keep]
COLUMN_BLOCK = 4096  # rotate()'s float64 products, this many columns at a time


def solve(X, y, Cs, loss: str, n_classes: int, max_iter: int = 500, tol: float = 1e-6, init=None, scale=None,
          basis=None):
    """Weights (G, d + 1, k) for every C in ``Cs``: rows 0..d-1 multiply the features, row d is the intercept.

    ``X`` is a float tensor (n, d) already on the device, ``y`` int64 (n,). Each objective is divided
    by ``C * n`` (the same minimiser) so that one tolerance fits every C. L-BFGS works on ``u`` with
    ``w = basis @ (scale * u)``: ``basis`` (d, d) orthonormal (default identity) and ``scale`` (d,) a
    diagonal preconditioner in its coordinates; the objective and the returned weights are ``w``'s.
    """
    import torch

    n, d = X.shape
    G = len(Cs)
    C = torch.as_tensor(np.asarray(Cs, dtype=np.float64), dtype=X.dtype, device=X.device).view(G, 1, 1)
    Xb = hinge.with_ones(X)
    s = torch.ones(d, dtype=X.dtype, device=X.device) if scale is None else scale.to(X.dtype)
    s = torch.cat([s, torch.ones(1, dtype=X.dtype, device=X.device)]).view(1, d + 1, 1)
    B = None if basis is None else torch.block_diag(basis.to(X.dtype), torch.ones(1, 1, dtype=X.dtype,
                                                                                     device=X.device))

    def weights(U):
        return s * U if B is None else B @ (s * U)

    U = torch.zeros(G, d + 1, n_classes, dtype=X.dtype, device=X.device)
    if init is not None:  # a neighbouring C's solution: the path from small to large C converges in few steps
        U.copy_((init if B is None else B.T @ init) / s)
    penalised = torch.ones(1, d + 1, 1, dtype=X.dtype, device=X.device)
    if loss == "logreg":
        penalised[0, d, 0] = 0.0  # scikit-learn does not penalise the intercept (B keeps it apart)
    onehot = torch.zeros(n, 1, n_classes, dtype=X.dtype, device=X.device)
    onehot[torch.arange(n, device=X.device), 0, y] = 1.0
    signs = 2.0 * onehot - 1.0

    def closure():
        """The objective, its gradient set by hand: ``(R' X)'`` reads X row-major, 4-5x faster on the CPU
        than autograd's ``X' R`` for tall X (45,000 x 1,793: 100 against 515 ms)."""
        with torch.no_grad():
            W = weights(U)
            scores = hinge.times(Xb, W.permute(1, 0, 2).reshape(d + 1, G * n_classes)).view(n, G, n_classes)
            if loss == "logreg":
                # per row first: the difference of the two sums loses float32's digits
                data = (torch.logsumexp(scores, dim=2) - (scores * onehot).sum(2)).sum(0)
                R = torch.softmax(scores, dim=2) - onehot
            else:
                margin = (1.0 - signs * scores).clamp(min=0.0)
                data = margin.pow(2).sum(dim=(0, 2))
                R = -2.0 * signs * margin
            grad = (R.view(n, G * n_classes).T @ Xb).view(G, n_classes, d + 1).transpose(1, 2)
            grad = grad + penalised * W / C  # w's gradient; u's is s * B' times it
            value = ((data + 0.5 * (W.pow(2) * penalised).sum(dim=(1, 2)) / C.view(G)) / n).sum()
            U.grad = (s * (grad if B is None else B.T @ grad) / n).contiguous()
        return value

    optimizer = torch.optim.LBFGS([U], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=tol * 1e-3,
                                  history_size=HISTORY, line_search_fn="strong_wolfe")
    optimizer.step(closure)
    return weights(U)


# L-BFGS's preconditioner on rotated features: the logistic Hessian is I / C + Z' D Z with D the
# softmax curvature, which at the fitted probabilities lies far below its bound of 1/4 (the sharper the
# fit, the lower). Measured in objective evaluations for four C: on three tap pairs of the sweep
# benchmark (272, 608 and 3,328 columns) 0.001-0.003 took the fewest (310-340, against 470-770
# unpreconditioned and 410-600 at 0.01-0.03); on 45,000 x 1,792 near-separable rows (benchmarks/sweep.py
# --large) 740 at 0.002, 499 at 0.0005, 427 at 0.0002; the digits benchmark's 24 pairs took 14.5, 12.9
# and 18.6 s at those three. The squared hinge's L-BFGS (where Newton's Hessians would not fit) uses
# the same value, not tuned.
CURVATURE = 0.0005

# L-BFGS's memory: on 45,000 x 1,792 the four C took 367 evaluations with 50 pairs against 499 with 20
# (100: 256, but stopping 2% higher at C = 10); the digits benchmark's logreg did not change beyond
# its run-to-run noise (24 pairs: 12.4 and 14.1 s with 20, 12.1 and 10.9 s with 50).
HISTORY = 50


def solve_path(X, y, Cs, loss: str, n_classes: int, max_iter: int = 1000, tol: float = 1e-5, rotated=None) -> list:
    """One solution (d + 1, k) per C, in the order of ``Cs``, solved from the smallest C up, warm-started,
    on the rotated features of :func:`rotate` (mapped back before they are returned), or on ``rotated``'s:
    ``(Z, S, back)`` from :func:`featcache.solvers.lanes.solve_many` for the same features (fewer rows than
    columns), where the combination's logistic regressions rotated them already.

    The squared hinge takes exact Newton steps (:mod:`~featcache.solvers.hinge`) wherever their Hessians
    fit in memory: L-BFGS stopped short of LinearSVC's objective at C >= 0.1 (4e-2 above it at C = 1
    after 500 steps on 900 x 3,328) and had not finished 45,000 x 1,792 after 280 s. Where the rows'
    form applies and the rows are on a GPU, every C at once (fewer, larger launches and syncs; on the
    CPU that took 1.4x the warm-started path's time, a warm start's fewer steps being lost).
    """
    import torch

    labels = hashlib.sha1(torch.as_tensor(y).cpu().numpy().tobytes()).hexdigest()
    key = (_content(X), labels, loss, n_classes, max_iter, tol)
    if all((*key, C) in _SOLVED for C in Cs):  # solved in this process: a kept run fits its sweep row's C again
        return [_SOLVED[(*key, C)].clone() for C in Cs]
    if rotated is not None:
        Z, S, back = rotated
        V = None
    else:
        Z, V, S = rotate(X)
        back = None if Z is None else (lambda u: V @ u)
    rows = Z if Z is not None else X
    out = {}
    grid = sorted(set(Cs))
    at_once = rows.is_cuda  # not measured on a GPU yet: gpu.sh's sweep_solvers step prints both ways
    by_rows = loss == "svm" and hinge_rows.through_rows(*rows.shape, len(grid) if at_once else 1)
    form = hinge_rows.rows_form(rows) if by_rows else None
    if form is not None and at_once:  # one Newton lane per (C, class)
        out = dict(zip(grid, hinge_rows.newton_rows(form, y, grid, n_classes)))
    newton, state, previous = loss == "svm" and hinge.fits(rows.shape[1], n_classes), None, None
    for C in sorted(set(Cs) - set(out)):
        if form is not None:  # one Newton lane per class
            [previous] = hinge_rows.newton_rows(form, y, [C], n_classes, init=previous)
        elif newton:
            previous, state = hinge.newton_features(rows, y, C, n_classes, init=previous, state=state)
        else:
            scale = (1.0 + C * CURVATURE * S.double().pow(2)).rsqrt()
            previous = solve(rows, y, [C], loss, n_classes, max_iter, tol, init=previous, scale=scale,
                             basis=V if Z is None else None)[0]
        out[C] = previous
    solved = {C: out[C] if Z is None else torch.cat([back(out[C][:-1]), out[C][-1:]]) for C in out}  # Z: rotated
    for C, W in solved.items():
        _SOLVED[(*key, C)] = W.clone()
        while len(_SOLVED) > SOLVED_KEPT:
            _SOLVED.popitem(last=False)
    return [solved[C] for C in Cs]


# This process's last solutions, by the features' and labels' numbers (:func:`_content`), loss and C: a sweep's kept
# svm run fitted its row's C twice more on the same rows (its choice, then its calibration's fit on every row; in
# the CIFAR-size command now served in 0.1-0.2 s, benchmarks/RESULTS.md). The optimum of a strongly convex
# objective is one: the same answer, not a start.
_SOLVED: OrderedDict = OrderedDict()
SOLVED_KEPT = 64


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
