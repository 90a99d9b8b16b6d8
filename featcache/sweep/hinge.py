"""The linear SVM's squared hinge by exact Newton steps, in whichever of its two forms is smaller.

Flow: sweep/run -> probes -> solvers -> **hinge**. The objective is ``LinearSVC``'s primal, one-vs-rest:
``f(w) = |w|^2 / 2 + C sum_i max(0, 1 - s_i w.x_i)^2`` per class, the intercept a penalised feature of
value 1. It is piecewise quadratic: its Hessian is ``I + 2C X_A' X_A`` over the rows A inside the
margin, so a Newton step is exact on its piece and the search ends once a whole step leaves A as it
was. Where L-BFGS crawls (its four C on 45,000 x 1,792 had not finished after 280 s) Newton's few
steps cost only the Hessians, and those change by the rows that cross the margin.

- :func:`newton_rows`, up to three times as many rows as features: one lane per (C, class), every class of
  one C (the CPU's way: warm-started from the last C) or of every C at once (a GPU's), each step by
  Woodbury through the margin's rows A or the rest, whichever is fewer (900 x 3,328 costs at most
  450-square solves), the lanes' squares factorised together.
- :func:`newton_features`, more rows than that: every class at once, one (d+1)-square
  Hessian per class kept from step to step and C to C (``state``), updated by the rows that entered
  or left the margin, rebuilt when that is cheaper.
"""

from __future__ import annotations

import numpy as np

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


# What the rows' form may hold, in rows-square float64 matrices of HESSIAN_ENTRIES: as much as it held
# at 8,192 rows when it solved one C at a time
ROWS_SQUARES = 6


def through_rows(n_rows: int, n_features: int, n_grid: int = 1) -> bool:
    """Whether :func:`newton_rows` is the cheaper form and what it holds fits (``ROWS_SQUARES``): ``X`` and the
    rows' and features' Gram matrices (:func:`rows_form`), and per C of the grid the ``L``, ``T`` and ``T'T`` of
    :func:`inverse_hessian_times`, each at most rows-square (one C: up to 8,192 rows; four C: 5,180, 3.2 GB)."""
    return n_rows <= ROWS_PER_FEATURE * n_features and (3 + 3 * n_grid) * n_rows**2 <= ROWS_SQUARES * HESSIAN_ENTRIES


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
        state = {"gram": _gram(Xb), "active": torch.zeros(n, n_classes, dtype=torch.bool, device=X.device),
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


def newton_rows(form: dict, y, Cs, n_classes: int, max_iter: int = 50, tol: float = 1e-7, init=None) -> list:
    """Every class of every C at once, for ``X`` (n, d) with few rows (``form`` from :func:`rows_form`): one lane
    per (C, class), each with its own exact Newton steps (:func:`inverse_hessian_times`), Armijo step and
    stopping test (:func:`newton_features`'), the products with ``X`` shared by all lanes. Returns one W
    (d + 1, k) per C, in the order of ``Cs``, in X's dtype. ``init``: a starting W (d + 1, k) for every C
    (``benchmarks/sweep.py --solvers`` walks the grid one C at a time from the last solution that way).

    On the sweep benchmark's pairs (900 rows, 2-core CPU) every C at once took 1.4x the time of one C at a
    time warm-started (13.5 against 9.8 s), to the same objectives (benchmarks/RESULTS.md, "Seventh run"):
    from zero the lanes need more steps, which sharing the products and factorisations does not pay for there."""
    import torch

    Xb = form["Xb"]
    n, G = len(Xb), len(Cs)
    signs = Xb.new_full((n, n_classes), -1.0)
    signs[torch.arange(n, device=Xb.device), y] = 1.0
    signs = signs.repeat(1, G)  # lane l: C number l // k, class l % k
    C = torch.as_tensor(np.asarray(Cs, np.float64), device=Xb.device).repeat_interleave(n_classes)
    W = Xb.new_zeros(Xb.shape[1], G * n_classes) if init is None else init.to(Xb).repeat(1, G)
    scores = Xb @ W  # then moved along with W
    todo = torch.ones(G * n_classes, dtype=torch.bool, device=Xb.device)
    whole, before, first = torch.zeros_like(todo), None, None
    factors: dict = {}  # per C, what steps through the rest of the rows need, made when first wanted
    for _ in range(max_iter):
        margin = 1.0 - signs * scores
        active = margin > 0
        grad = W - 2 * C * (Xb.T @ (signs * margin.clamp(min=0)))
        norms = grad.norm(dim=0)
        first = norms if first is None else first
        done = norms <= tol * first
        if before is not None:
            done |= whole & (active == before).all(dim=0)  # the whole step kept the margin's rows: it was exact
        todo &= ~done
        if not todo.any():
            break
        step = torch.zeros_like(W)
        lanes = todo.nonzero().squeeze(1)
        step[:, lanes] = -inverse_hessian_times(form, Cs, lanes // n_classes, active[:, lanes], grad[:, lanes],
                                                factors)
        moved = Xb @ step
        t = _line_search(W, step, margin, signs * moved, grad, C)[0]
        W += t * step
        scores += t * moved
        whole, before = t == 1.0, active
    return [W[:, g * n_classes:(g + 1) * n_classes].to(form["dtype"]) for g in range(G)]


def inverse_hessian_times(form: dict, Cs, which, active, g, factors: dict):
    """``H_l^-1 g_l`` for every lane l (the columns of ``g``), ``H_l = I + 2C X_A' X_A`` with ``C = Cs[which[l]]``
    and A the rows where ``active[:, l]``, by Woodbury through whichever of A and the rest R is fewer (a Newton
    path from w = 0 starts with every row in A), so the squares factorised are at most n / 2 wide:

    - through A: ``H^-1 g = g - X_A' (I / 2C + X_A X_A')^-1 X_A g``, cut from the rows' Gram matrix;
    - through R: ``H = B - 2C X_R' X_R`` with ``B = I + 2C X'X = L L'``, so ``H^-1 g =
      L'^-1 (h + T_R (I / 2C - T_R' T_R)^-1 T_R' h)`` with ``h = L^-1 g`` and ``T = L^-1 X'``, whose L,
      T and T'T ``factors`` keeps per C for the next steps.

    The lanes of each kind are solved together (:func:`_within`: their squares padded to the largest).
    """
    import torch

    Xb = form["Xb"]
    n = len(Xb)
    C = torch.as_tensor(np.asarray(Cs, np.float64), device=Xb.device)[which]
    out = torch.empty_like(g)
    through_a = 2 * active.sum(0) <= n
    if through_a.any():
        ga = g[:, through_a]
        out[:, through_a] = ga - Xb.T @ _within(form["rows"], active[:, through_a], 1 / (2 * C[through_a]), Xb @ ga)
    for c in which[~through_a].unique().tolist():
        lanes = ~through_a & (which == c)
        if c not in factors:
            B = 2 * Cs[c] * form["features"]
            B.diagonal().add_(1.0)
            L = torch.linalg.cholesky(B)
            T = torch.linalg.solve_triangular(L, Xb.T, upper=False)
            factors[c] = (L, T, -(T.T @ T))
        L, T, minus_k = factors[c]
        h = torch.linalg.solve_triangular(L, g[:, lanes], upper=False)
        h += T @ _within(minus_k, ~active[:, lanes], 1 / (2 * C[lanes]), T.T @ h)
        out[:, lanes] = torch.linalg.solve_triangular(L.T, h, upper=True)
    return out


def _within(K, rows, diagonal, rhs):
    """Per lane l (the columns of ``rows``, bool (n, lanes)): ``(K_AA + diagonal_l I)^-1 rhs_A`` over its rows A,
    returned (n, lanes) with zeros outside A. Lanes of similar |A| are factorised together (:func:`_groups`),
    their squares cut from ``K`` (n, n) and padded to the group's largest A with an identity block."""
    import torch

    out = torch.zeros_like(rhs)
    counts = rows.sum(0)
    m = int(counts.max())
    if m == 0:
        return out
    order = torch.argsort((~rows).to(torch.uint8), dim=0, stable=True)[:m]  # each lane's rows first
    valid = torch.arange(m, device=K.device).unsqueeze(1) < counts  # (m, lanes)
    for lanes, size in _groups(counts.tolist()):
        lanes = torch.tensor(lanes, device=K.device)
        idx, ok = order[:size, lanes].T, valid[:size, lanes].T  # (group, size)
        M = K[idx.unsqueeze(2), idx.unsqueeze(1)].mul_(ok.unsqueeze(2) & ok.unsqueeze(1))
        M.diagonal(dim1=1, dim2=2).add_(torch.where(ok, diagonal[lanes].unsqueeze(1), 1.0))
        b = torch.gather(rhs[:, lanes], 0, idx.T).T * ok
        beta = _spd_solve(M, b.unsqueeze(2)).squeeze(2)
        out[:, lanes] = torch.zeros_like(rhs[:, lanes]).scatter_(0, idx.T, beta.T)  # padding scatters zeros
    return out


def _groups(counts: list) -> list:
    """The lanes in groups (lanes, padded size) to factorise together: by decreasing |A|, a group's lanes at least
    ``GROUP_FILL`` of its first's (so padding at most doubles the work), at most ``HESSIAN_ENTRIES`` entries."""
    groups: list = []
    for lane in sorted(range(len(counts)), key=lambda lane: -counts[lane]):
        if counts[lane] == 0:
            break  # nothing to solve: its zeros stand
        if groups and counts[lane] >= GROUP_FILL * groups[-1][1] and \
                (len(groups[-1][0]) + 1) * groups[-1][1] ** 2 <= HESSIAN_ENTRIES:
            groups[-1][0].append(lane)
        else:
            groups.append(([lane], counts[lane]))
    return groups


GROUP_FILL = 0.8
