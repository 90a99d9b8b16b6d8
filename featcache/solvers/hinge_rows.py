"""The squared hinge's exact Newton through the rows, for few rows: every class (and C) a lane.

Flow: sweep/run -> probes -> solvers -> **hinge_rows** (-> hinge: its objective, line search and
solves). Up to three times as many rows as features, a Newton step is cheapest by Woodbury through
the margin's rows A or the rest, whichever is fewer (900 x 3,328 costs at most 450-square solves), from
the rows' Gram matrix. :func:`newton_rows` solves lanes (C, class) together: each its own step, Armijo
search and stopping test, the products with X shared and the lanes' squares factorised together
(:func:`_within`), every class of one C (the CPU's way, warm-started C after C) or of every C at once
(a GPU's).
"""

from __future__ import annotations

import numpy as np

from featcache.solvers import hinge

# The rows' form while rows are at most this many times the features: at 1,792 features (10 classes,
# four C) 1,800 rows took 3.6 s through the rows against 20.1 s through the features, 3,600 rows 10.6
# against 21.7, 5,400 rows 24.1 against 24.1, 7,200 rows 53.4 against 23.0
ROWS_PER_FEATURE = 3

# What the rows' form may hold, in rows-square float64 matrices of hinge.HESSIAN_ENTRIES: as much as it held
# at 8,192 rows when it solved one C at a time
ROWS_SQUARES = 6


def through_rows(n_rows: int, n_features: int, n_grid: int = 1) -> bool:
    """Whether :func:`newton_rows` is the cheaper form and what it holds fits (``ROWS_SQUARES``): ``X`` and the
    rows' and features' Gram matrices (:func:`rows_form`), and per C of the grid the ``L``, ``T`` and ``T'T`` of
    :func:`inverse_hessian_times`, each at most rows-square (one C: up to 8,192 rows; four C: 5,180, 3.2 GB)."""
    held = (3 + 3 * n_grid) * n_rows**2
    return n_rows <= ROWS_PER_FEATURE * n_features and held <= ROWS_SQUARES * hinge.HESSIAN_ENTRIES


def rows_form(X) -> dict:
    """What :func:`newton_rows` keeps for every C of a path: ``X`` with its constant feature in float64, the
    rows' Gram matrix and the features' (their size bounded by :func:`through_rows`)."""
    Xb = hinge.with_ones(X).double()
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
        t = hinge.line_search(W, step, margin, signs * moved, grad, C)[0]
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
        beta = hinge.spd_solve(M, b.unsqueeze(2)).squeeze(2)
        out[:, lanes] = torch.zeros_like(rhs[:, lanes]).scatter_(0, idx.T, beta.T)  # padding scatters zeros
    return out


def _groups(counts: list) -> list:
    """The lanes in groups (lanes, padded size) to factorise together: by decreasing |A|, a group's lanes at least
    ``GROUP_FILL`` of its first's (so padding at most doubles the work), at most ``hinge.HESSIAN_ENTRIES`` entries."""
    groups: list = []
    for lane in sorted(range(len(counts)), key=lambda lane: -counts[lane]):
        if counts[lane] == 0:
            break  # nothing to solve: its zeros stand
        if groups and counts[lane] >= GROUP_FILL * groups[-1][1] and \
                (len(groups[-1][0]) + 1) * groups[-1][1] ** 2 <= hinge.HESSIAN_ENTRIES:
            groups[-1][0].append(lane)
        else:
            groups.append(([lane], counts[lane]))
    return groups


GROUP_FILL = 0.8
