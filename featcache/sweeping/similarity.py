"""How much two taps say the same thing: linear centered kernel alignment (CKA), and its debiased form.

Inside the sweep's machinery (scorers, **similarity**), used by ``choose`` to say whether a fused pair's taps
are worth fusing. Kornblith, Norouzi, Lee and Hinton, "Similarity of neural network representations
revisited", ICML 2019: with column-centred features X (N, a) and Y (N, b),
``CKA = ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F)``: 1 for representations equal up to rotation and isotropic
scaling, near 0 for unrelated ones. The debiased form replaces each HSIC by its unbiased estimator (Song et al.,
JMLR 2012), as Nguyen, Raghu and Kornblith (ICLR 2021) use it for few rows. Both are computed in feature space
(a cross product of the two taps, O(N a b)), never from the N x N Gram matrices.
"""

from __future__ import annotations

import numpy as np


def _debiased(xty: float, rows_x: np.ndarray, rows_y: np.ndarray, norm_x: float, norm_y: float, n: int) -> float:
    """The unbiased HSIC (times a constant that cancels in CKA) from the plain one and the rows' squared norms."""
    return xty - n / (n - 2.0) * float(rows_x @ rows_y) + norm_x * norm_y / ((n - 1) * (n - 2))


def linear_cka(X: np.ndarray, Y: np.ndarray, debiased: bool = False) -> float:
    """Linear CKA between two taps' rows (the same images, in the same order)."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if len(X) != len(Y):
        raise ValueError("CKA compares two taps on the same rows")
    X = X - X.mean(axis=0, keepdims=True)
    Y = Y - Y.mean(axis=0, keepdims=True)
    xty = float(np.linalg.norm(X.T @ Y) ** 2)
    xtx, yty = float(np.linalg.norm(X.T @ X)), float(np.linalg.norm(Y.T @ Y))
    if debiased:
        n = len(X)
        if n < 4:
            raise ValueError("debiased CKA needs at least 4 rows")
        rows_x, rows_y = np.einsum("ij,ij->i", X, X), np.einsum("ij,ij->i", Y, Y)
        sx, sy = float(rows_x.sum()), float(rows_y.sum())
        xty = _debiased(xty, rows_x, rows_y, sx, sy, n)
        xtx = np.sqrt(max(_debiased(xtx ** 2, rows_x, rows_x, sx, sx, n), 0.0))
        yty = np.sqrt(max(_debiased(yty ** 2, rows_y, rows_y, sy, sy, n), 0.0))
    denominator = xtx * yty
    return float(xty / denominator) if denominator > 0 else float("nan")
