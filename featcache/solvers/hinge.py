"""The linear SVM's squared hinge by exact Newton steps, in whichever of its two forms is smaller.

Flow: sweep/run -> probes -> solvers -> **hinge**. The objective is ``LinearSVC``'s primal, one-vs-rest:
``f(w) = |w|^2 / 2 + C sum_i max(0, 1 - s_i w.x_i)^2`` per class, the intercept a penalised feature of
value 1. It is piecewise quadratic: its Hessian is ``I + 2C X_A' X_A`` over the rows A inside the
margin, so a Newton step is exact on its piece and the search ends once a whole step leaves A as it
was. Where L-BFGS crawls (its four C on 45,000 x 1,792 had not finished after 280 s) Newton's few
steps cost only the Hessians, and those change by the rows that cross the margin.

- :mod:`~featcache.solvers.hinge_rows`, up to three times as many rows as features: one lane per (C, class),
  every class of one C (the CPU's way: warm-started from the last C) or of every C at once (a GPU's),
  each step by Woodbury through the margin's rows A or the rest, whichever is fewer.
- :func:`newton_features`, more rows than that: every class at once, one (d+1)-square
  Hessian per class kept from step to step and C to C (``state``), updated by the rows that entered
  or left the margin, rebuilt when that is cheaper.
"""

from __future__ import annotations

# Newton on the features keeps k (d+1)-square float64 Hessians and a scaled copy of them: above this
# many entries each (512 MB; 10 classes up to 2,589 features, 100 up to 818) it falls back to L-BFGS
HESSIAN_ENTRIES = 64 * 2**20


def times(X, W):
    """``X @ W`` for a tall ``X`` and a few columns, through ``linear`` with ``W``'s transpose made contiguous:
    45,000 x 1,793 by 10 columns in float32 took 44 ms that way against 70 ms as ``X @ W`` (MKL on the 2-core
    Zen 4 CPU)."""
    import torch

    return torch.nn.functional.linear(X, W.T.contiguous())


def with_ones(X):
    """``X`` (n, d) with a column of ones appended: the intercept as a feature."""
    import torch

    return torch.cat([X, X.new_ones(len(X), 1)], dim=1)


def fits(n_features: int, n_classes: int) -> bool:
    """Whether :func:`newton_features` may keep its Hessians for this many features and classes."""
    return n_classes * (n_features + 1) ** 2 <= HESSIAN_ENTRIES


def newton_features(X, y, C: float, n_classes: int, init=None, state: dict | None = None, max_iter: int = 50,
                    tol: float = 1e-7):
    """Every class's squared hinge at once, for ``X`` (n, d) with many rows. Returns (W (d + 1, k), state).

    The passes over ``X`` run in its dtype (float32 at scale), everything (d+1)-sized in float64.
    ``state`` carries the features' Gram matrix and the Hessians to the next C of a path (they
    depend on the margin's rows, not on C). A class stops when its gradient fell by ``tol``, when a
    whole step left its margin's rows unchanged (the step was then exact), or when a step lowered
    ``f`` by less than a relative 1e-12 (rows on the margin's edge can flip in float32 rounding).
    """
    import torch

    n, d = X.shape
    f64 = dict(dtype=torch.float64, device=X.device)
    Xb = with_ones(X)
    signs = X.new_full((n, n_classes), -1.0)
    signs[torch.arange(n, device=X.device), y] = 1.0
    W = torch.zeros(d + 1, n_classes, **f64) if init is None else init.to(**f64).clone()
    if state is None:
        state = {"gram": gram(Xb), "active": torch.zeros(n, n_classes, dtype=torch.bool, device=X.device),
                 "built": [False] * n_classes, "hessians": torch.empty(n_classes, d + 1, d + 1, **f64),
                 "work": torch.empty(n_classes, d + 1, d + 1, **f64)}  # reused: fresh 257 MB cost page faults
    todo = torch.ones(n_classes, dtype=torch.bool, device=X.device)
    whole = stalled = torch.zeros_like(todo)  # the last step was taken whole / lowered f by almost nothing
    first, before = None, None
    for _ in range(max_iter):
        margin = (1.0 - signs * times(Xb, W.to(X.dtype))).double()
        active = margin > 0
        grad = W - 2 * C * ((signs * margin.clamp(min=0)).to(X.dtype).T @ Xb).T.double()  # (R'X)': X row-major
        norms = grad.norm(dim=0)
        first = norms if first is None else first
        done = norms <= tol * first
        if before is not None:
            done |= whole & (active == before).all(dim=0)
        todo &= ~(done | stalled)
        if not todo.any():
            break
        ks = todo.nonzero().flatten().tolist()
        _update_hessians(Xb, state, active, ks)
        H = torch.index_select(state["hessians"], 0, torch.tensor(ks, device=X.device), out=state["work"][:len(ks)])
        H.mul_(2 * C).diagonal(dim1=1, dim2=2).add_(1.0)
        step = torch.zeros_like(W)
        step[:, ks] = -spd_solve(H, grad[:, ks].T.unsqueeze(2)).squeeze(2).T
        moved = (signs * times(Xb, step.to(X.dtype))).double()  # how far each margin moves per unit step
        t, f0, f1 = line_search(W, step, margin, moved, grad, C)
        W += t * step
        stalled = f0 - f1 <= 1e-12 * f0
        whole, before = t == 1.0, active
    return W.to(X.dtype), state


def _update_hessians(Xb, state: dict, active, ks: list) -> None:
    """``hessians[k] = Xb_A' Xb_A`` for the rows A active in class k, for the classes ``ks``: by the rows
    that crossed the margin since the last update, or afresh from the fewer of A and its complement."""
    n = len(Xb)
    for k in ks:
        now, then = active[:, k], state["active"][:, k]
        size = int(now.sum())
        entered, left = now & ~then, then & ~now
        moved = int(entered.sum()) + int(left.sum())
        if state["built"][k] and moved == 0:
            continue
        if state["built"][k] and moved < min(size, n - size):
            state["hessians"][k] += gram(Xb[entered]) - gram(Xb[left])
        else:
            state["hessians"][k] = gram(Xb[now]) if size <= n // 2 else state["gram"] - gram(Xb[~now])
            state["built"][k] = True
        state["active"][:, k] = now


def gram(rows):
    """``rows' rows`` in float64, its products in the rows' dtype: only the blocks on and above the diagonal
    (``GRAM_BLOCK`` columns a block), mirrored. 2,000 x 1,793 float32 took 53 ms so against 87 ms whole (8,000
    rows: 186 against 325 ms; 500 rows: the same), on the 2-core Zen 4 CPU."""
    import torch

    d = rows.shape[1]
    out = torch.empty(d, d, dtype=torch.float64, device=rows.device)
    for lo in range(0, d, GRAM_BLOCK):
        hi = min(lo + GRAM_BLOCK, d)
        part = (rows[:, lo:hi].T @ rows[:, lo:]).double()
        out[lo:hi, lo:], out[lo:, lo:hi] = part, part.T
    return out


GRAM_BLOCK = 448


def line_search(W, step, margin, moved, grad, C):
    """Per class (or lane: ``C`` a float or one per column), the whole step or the first of its halvings that
    decreases ``f`` enough (Armijo, 0.01): every trial costs O(n) per column, the margins' moves being known.
    Returns (t, f before, f after)."""
    import torch

    def value(t):
        return 0.5 * (W + t * step).pow(2).sum(0) + C * (margin - t * moved).clamp(min=0).pow(2).sum(0)

    f0, slope = value(torch.zeros(1, dtype=W.dtype, device=W.device)), (grad * step).sum(0)
    t = torch.ones(W.shape[1], dtype=W.dtype, device=W.device)
    for _ in range(30):
        f1 = value(t)
        enough = f1 <= f0 + 0.01 * t * slope
        if enough.all():
            break
        t = torch.where(enough, t, t / 2)
    return t, f0, f1


def spd_solve(M, b):
    """``M^-1 b`` for symmetric positive definite ``M`` (batches too): Cholesky, then two triangular solves
    (``cholesky_solve`` took 100 ms where these take 18, for 10 x 1,793-square in float64)."""
    import torch

    L = torch.linalg.cholesky(M)
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, b, upper=False), upper=True)
