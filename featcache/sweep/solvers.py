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
  the intercept penalised as liblinear's (a constant feature of value 1), by exact Newton steps
  (:func:`svm_newton`).
"""

from __future__ import annotations

import numpy as np

LOSSES = ("logreg", "svm")


def rotate(X):
    """``(Z, V, S)`` with ``X = Z @ V.T`` exactly, ``V`` orthonormal columns and ``Z.T @ Z = diag(S**2)``.

    Both objectives penalise ``|w|^2`` and see the features only through ``X @ w``, so their
    solutions lie in the row space of ``X`` and are unchanged by rotating it: solving on ``Z``
    and mapping back ``w = V @ u`` gives the same weights. With fewer rows than features
    (1,000 images, 3,328 columns) ``Z`` has only as many columns as rows, and its orthogonal
    columns let a diagonal rescaling (:func:`solve`'s ``scale``) precondition L-BFGS.
    """
    import torch

    global _ROTATED
    if _ROTATED is not None and _ROTATED[0] is X:  # logreg and svm of one combination share it
        return _ROTATED[1]
    n, d = X.shape
    X64 = X.double()
    if n < d:  # through the rows' Gram matrix: an n-square eigenproblem, 15x faster than the SVD
        S2, U = torch.linalg.eigh(X64 @ X64.T)
        keep = S2 > S2.max() * 1e-12  # standardised rows span n - 1 dimensions at most: drop the null ones
        S = S2[keep].sqrt()
        Z, V = U[:, keep] * S, (X64.T @ U[:, keep]) / S
    else:  # through the features' Gram matrix: d-square
        S2, V = torch.linalg.eigh(X64.T @ X64)
        S, Z = S2.clamp(min=0).sqrt(), X64 @ V
    _ROTATED = (X, (Z.to(X.dtype), V.to(X.dtype), S.to(X.dtype)))
    return _ROTATED[1]


_ROTATED = None


def solve(X, y, Cs, loss: str, n_classes: int, max_iter: int = 500, tol: float = 1e-6, init=None, scale=None):
    """Weights (G, d + 1, k) for every C in ``Cs``: rows 0..d-1 multiply the features, row d is the intercept.

    ``X`` is a float tensor (n, d) already on the device, ``y`` int64 (n,). Each objective is divided
    by ``C * n`` (the same minimiser) so that one tolerance fits every C. ``scale`` (d,): L-BFGS works
    on ``u = w / scale`` (a diagonal preconditioner; the objective and the returned weights are ``w``'s).
    """
    import torch

    n, d = X.shape
    G = len(Cs)
    C = torch.as_tensor(np.asarray(Cs, dtype=np.float64), dtype=X.dtype, device=X.device).view(G, 1, 1)
    ones = torch.ones(n, 1, dtype=X.dtype, device=X.device)
    s = torch.ones(d, dtype=X.dtype, device=X.device) if scale is None else scale.to(X.dtype)
    s = torch.cat([s, torch.ones(1, dtype=X.dtype, device=X.device)]).view(1, d + 1, 1)
    Xb = torch.cat([X, ones], dim=1) * s.view(1, d + 1)
    U = torch.zeros(G, d + 1, n_classes, dtype=X.dtype, device=X.device)
    if init is not None:  # a neighbouring C's solution: the path from small to large C converges in few steps
        U.copy_(init / s)
    U.requires_grad_(True)
    penalised = s.pow(2).clone()
    if loss == "logreg":
        penalised[0, d, 0] = 0.0  # scikit-learn does not penalise the intercept
    if loss == "svm":
        signs = -torch.ones(n, n_classes, dtype=X.dtype, device=X.device)
        signs[torch.arange(n, device=X.device), y] = 1.0

    def objective():
        scores = torch.einsum("nd,gdk->gnk", Xb, U)
        if loss == "logreg":
            data = torch.nn.functional.cross_entropy(scores.reshape(G * n, n_classes), y.repeat(G),
                                                     reduction="none").view(G, n).sum(1)
        else:
            data = torch.clamp(1.0 - signs * scores, min=0.0).pow(2).sum(dim=(1, 2))
        reg = 0.5 * (U.pow(2) * penalised).sum(dim=(1, 2))
        return ((data + reg / C.view(G)) / n).sum()

    optimizer = torch.optim.LBFGS([U], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=tol * 1e-3,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = objective()
        value.backward()
        return value

    optimizer.step(closure)
    return (U * s).detach()


# L-BFGS's preconditioner on rotated features: the logistic Hessian is I / C + Z' D Z with D the
# softmax curvature, which at the fitted probabilities lies far below its bound of 1/4. On three tap
# pairs of the sweep benchmark (272, 608 and 3,328 columns, four C) 0.001-0.003 took the fewest
# objective evaluations (310-340, against 470-770 unpreconditioned and 410-600 at 0.01-0.03).
CURVATURE = 0.002


def solve_path(X, y, Cs, loss: str, n_classes: int, max_iter: int = 1000, tol: float = 1e-8) -> list:
    """One solution (d + 1, k) per C, in the order of ``Cs``, solved from the smallest C up, warm-started,
    on the rotated features of :func:`rotate` (mapped back before they are returned).

    The squared hinge takes exact Newton steps (:func:`svm_newton`): L-BFGS stopped short of
    LinearSVC's objective at C >= 0.1 on wide features (4e-2 above it at C = 1 after 500 steps).
    """
    import torch

    Z, V, S = rotate(X)
    gram = None
    if loss == "svm" and len(Z) <= Z.shape[1] + 1:  # the Gram matrix of the rows, once for every C
        Zb = torch.cat([Z, torch.ones(len(Z), 1, dtype=Z.dtype, device=Z.device)], dim=1).double()
        gram = Zb @ Zb.T
    out = {}
    previous = None
    for C in sorted(set(Cs)):
        if loss == "svm":
            previous = svm_newton(Z, y, C, n_classes, init=previous, gram=gram)
        else:
            scale = (1.0 + C * CURVATURE * S.double().pow(2)).rsqrt()
            previous = solve(Z, y, [C], loss, n_classes, max_iter, tol, init=previous, scale=scale)[0]
        out[C] = previous
    return [torch.cat([V @ out[C][:-1], out[C][-1:]]) for C in Cs]


def svm_newton(X, y, C: float, n_classes: int, max_iter: int = 50, tol: float = 1e-7, init=None, gram=None):
    """One-vs-rest squared hinge (``LinearSVC``'s primal, the intercept a penalised feature of value 1)
    by exact Newton steps, one class at a time. Returns (d + 1, k).

    ``f(w) = |w|^2 / 2 + C sum_i max(0, 1 - s_i w.x_i)^2`` is piecewise quadratic; its Hessian is
    ``I + 2C X_A' X_A`` over the rows A inside the margin. The step solves it through the smaller of
    its two forms: the (d+1)-square system, or by Woodbury the |A|-square ``I / 2C + X_A X_A'`` (a
    slice of ``gram``, the rows' Gram matrix with the constant feature), so a 900 x 3,328 problem
    costs 900-square solves.
    """
    import torch

    n, d = X.shape
    Xb = torch.cat([X, torch.ones(n, 1, dtype=X.dtype, device=X.device)], dim=1).double()
    W = torch.zeros(d + 1, n_classes, dtype=torch.float64, device=X.device) if init is None else init.double().clone()
    for k in range(n_classes):
        s = torch.where(y == k, 1.0, -1.0).to(Xb)
        w = W[:, k].clone()

        def value(w):
            return 0.5 * w.dot(w) + C * (1.0 - s * (Xb @ w)).clamp(min=0).pow(2).sum()

        f = value(w)
        first = None
        for _ in range(max_iter):
            scores = Xb @ w
            active = (1.0 - s * scores) > 0
            XA = Xb[active]
            g = w + 2 * C * (XA.T @ (scores[active] - s[active]))
            norm = g.norm()
            first = norm if first is None else first
            if norm <= tol * first:
                break
            if gram is not None:  # Woodbury: H^-1 g = g - X_A' (I / 2C + X_A X_A')^-1 X_A g
                M = gram[active][:, active] + torch.eye(int(active.sum()), dtype=Xb.dtype, device=Xb.device) / (2 * C)
                step = -(g - XA.T @ _spd_solve(M, XA @ g))
            else:
                step = -_spd_solve(2 * C * (XA.T @ XA) + torch.eye(d + 1, dtype=Xb.dtype, device=Xb.device), g)
            t, slope = 1.0, g.dot(step)
            for _ in range(30):  # the full step nearly always; halve it while the decrease is too small
                f_new = value(w + t * step)
                if f_new <= f + 0.01 * t * slope:
                    break
                t /= 2
            w, f = w + t * step, f_new
        W[:, k] = w
    return W.to(X.dtype)


def _spd_solve(M, b):
    """``M^-1 b`` for a symmetric positive definite ``M``, by Cholesky (half LU's work)."""
    import torch

    return torch.cholesky_solve(b.unsqueeze(1), torch.linalg.cholesky(M)).squeeze(1)


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
