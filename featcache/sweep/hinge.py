"""The linear SVM's squared hinge by exact Newton steps, in whichever of its two forms is smaller.

Flow: sweep/run -> probes -> solvers -> **hinge**. The objective is ``LinearSVC``'s primal, one-vs-rest:
``f(w) = |w|^2 / 2 + C sum_i max(0, 1 - s_i w.x_i)^2`` per class, the intercept a penalised feature of
value 1. It is piecewise quadratic: its Hessian is ``I + 2C X_A' X_A`` over the rows A inside the
margin, so a Newton step is exact on its piece and the search ends once a whole step leaves A as it
was. Where L-BFGS crawls (its four C on 45,000 x 1,792 had not finished after 280 s) Newton's few
steps cost only the Hessians, and those change by the rows that cross the margin.

- :func:`newton_rows`, up to three times as many rows as features: by Woodbury, through the margin's rows A
  or the rest, whichever is fewer (900 x 3,328 costs at most 450-square solves).
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


# The rows' form while rows are at most this many times the features: at 1,792 features (10 classes,
# four C) 1,800 rows took 3.6 s through the rows against 20.1 s through the features, 3,600 rows 10.6
# against 21.7, 5,400 rows 24.1 against 24.1, 7,200 rows 53.4 against 23.0
ROWS_PER_FEATURE = 3


def with_ones(X):
    """``X`` (n, d) with a column of ones appended: the intercept as a feature."""
    import torch

    return torch.cat([X, X.new_ones(len(X), 1)], dim=1)


def through_rows(n_rows: int, n_features: int) -> bool:
    """Whether :func:`newton_rows` is the cheaper form and its two rows-square float64 matrices (the rows'
    Gram matrix, and ``T'T`` of :func:`inverse_hessian_times`) fit in ``HESSIAN_ENTRIES`` each (up to
    8,192 rows)."""
    return n_rows <= ROWS_PER_FEATURE * n_features and n_rows**2 <= HESSIAN_ENTRIES


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
        state = {"gram": (Xb.T @ Xb).double(), "active": torch.zeros(n, n_classes, dtype=torch.bool, device=X.device),
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
        step[:, ks] = -_spd_solve(H, grad[:, ks].T.unsqueeze(2)).squeeze(2).T
        moved = (signs * times(Xb, step.to(X.dtype))).double()  # how far each margin moves per unit step
        t, f0, f1 = _line_search(W, step, margin, moved, grad, C)
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
            state["hessians"][k] += _gram(Xb[entered]) - _gram(Xb[left])
        else:
            state["hessians"][k] = _gram(Xb[now]) if size <= n // 2 else state["gram"] - _gram(Xb[~now])
            state["built"][k] = True
        state["active"][:, k] = now


def _gram(rows):
    return (rows.T @ rows).double()


def _line_search(W, step, margin, moved, grad, C: float):
    """Per class, the whole step or the first of its halvings that decreases ``f`` enough (Armijo, 0.01):
    every trial costs O(n) per class, the margins' moves being known. Returns (t, f before, f after)."""
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


def _spd_solve(M, b):
    """``M^-1 b`` for symmetric positive definite ``M`` (batches too): Cholesky, then two triangular solves
    (``cholesky_solve`` took 100 ms where these take 18, for 10 x 1,793-square in float64)."""
    import torch

    L = torch.linalg.cholesky(M)
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, b, upper=False), upper=True)


def rows_form(X) -> dict:
    """What :func:`newton_rows` keeps for every C of a path: ``X`` with its constant feature in float64, the
    rows' Gram matrix and the features' (the first in ``HESSIAN_ENTRIES``, see :func:`through_rows`)."""
    Xb = with_ones(X).double()
    return {"Xb": Xb, "rows": Xb @ Xb.T, "features": Xb.T @ Xb, "dtype": X.dtype}


def newton_rows(form: dict, y, C: float, n_classes: int, max_iter: int = 50, tol: float = 1e-7, init=None):
    """One class at a time, for ``X`` (n, d) with few rows (``form`` from :func:`rows_form`), each Newton
    step by :func:`inverse_hessian_times`. Returns W (d + 1, k) in X's dtype."""
    import torch

    Xb = form["Xb"]
    W = torch.zeros(Xb.shape[1], n_classes, dtype=torch.float64, device=Xb.device) if init is None else \
        init.double().clone()
    per_c = {}  # the factors of this C that steps through the rest of the rows share, made when first wanted
    for k in range(n_classes):
        s = torch.where(y == k, 1.0, -1.0).to(Xb)
        w = W[:, k].clone()
        scores = Xb @ w  # then moved along with w: one product with Xb per step
        before = first = None
        t = 0.0
        for _ in range(max_iter):
            margin = 1.0 - s * scores
            active = margin > 0
            if t == 1.0 and torch.equal(active, before):
                break  # the whole step kept the margin's rows: it was exact
            g = w - 2 * C * (Xb.T @ (s * margin.clamp(min=0)))
            norm = g.norm()
            first = norm if first is None else first
            if norm <= tol * first:
                break
            step = -inverse_hessian_times(form, C, active, g, per_c)
            moved = Xb @ step
            t = float(_line_search(w[:, None], step[:, None], margin[:, None], (s * moved)[:, None], g[:, None], C)[0])
            w, scores, before = w + t * step, scores + t * moved, active
        W[:, k] = w
    return W.to(form["dtype"])


def inverse_hessian_times(form: dict, C: float, active, g, per_c: dict):
    """``H^-1 g`` for ``H = I + 2C X_A' X_A``, A the rows where ``active``, by Woodbury through whichever of
    A and the rest R is fewer (a Newton path from w = 0 starts with every row in A), so the square
    factorised is at most n / 2 wide:

    - through A: ``H^-1 g = g - X_A' (I / 2C + X_A X_A')^-1 X_A g``, cut from the rows' Gram matrix;
    - through R: ``H = B - 2C X_R' X_R`` with ``B = I + 2C X'X = L L'``, so ``H^-1 g =
      L'^-1 (h + T_R (I / 2C - T_R' T_R)^-1 T_R' h)`` with ``h = L^-1 g`` and ``T = L^-1 X'``, whose L,
      T and T'T ``per_c`` keeps for the next step at the same C.
    """
    import torch

    Xb = form["Xb"]
    rows = active.nonzero().squeeze(1)
    if 2 * len(rows) <= len(Xb):
        XA = Xb[rows]
        M = form["rows"].index_select(0, rows).index_select(1, rows)
        M.diagonal().add_(1 / (2 * C))
        return g - XA.T @ _spd_solve(M, (XA @ g).unsqueeze(1)).squeeze(1)
    if not per_c:
        B = 2 * C * form["features"]
        B.diagonal().add_(1.0)
        L = torch.linalg.cholesky(B)
        T = torch.linalg.solve_triangular(L, Xb.T, upper=False)
        per_c.update(L=L, T=T, K=T.T @ T)
    L, T = per_c["L"], per_c["T"]
    h = torch.linalg.solve_triangular(L, g.unsqueeze(1), upper=False)
    rest = (~active).nonzero().squeeze(1)
    if len(rest):
        TR = T[:, rest]
        cap = -per_c["K"].index_select(0, rest).index_select(1, rest)
        cap.diagonal().add_(1 / (2 * C))
        h = h + TR @ _spd_solve(cap, TR.T @ h)
    return torch.linalg.solve_triangular(L.T, h, upper=True).squeeze(1)
