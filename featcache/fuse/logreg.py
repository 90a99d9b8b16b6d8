"""fuse-train's logistic regressions through the sweep's solver: every C of the grid in one batched L-BFGS.

Flow: evaluate.fit_select -> **logreg** -> solvers.lanes. The objective is scikit-learn's multinomial one
(``C * sum(cross-entropy) + |W|^2 / 2``, the intercept not penalised), so each solution is returned as an
ordinary ``sklearn.linear_model.LogisticRegression`` with its fitted attributes set: it predicts, gives
probabilities and is saved (skops) exactly as one scikit-learn fitted, and a run kept from a sweep holds the
weights its sweep row scored. At CIFAR size (45,000 x 1,792, 10 classes, four C) scikit-learn's lbfgs took
most of a kept run's time (``benchmarks/probes.py``: about 100 of a logreg sweep command's 202-223 s).

Two classes are left to scikit-learn: its binary model is a sigmoid over one weight vector, whose penalty is
not the two-column softmax's (the same model at twice the C), so the solutions would differ.
"""

from __future__ import annotations

import numpy as np


def applies(entry, X, y) -> bool:
    """Whether :func:`fit_every_c` fits head ``entry`` on these rows: the batched head (logreg), in memory (not
    streamed), at least three classes."""
    return entry.sweep == "batched" and isinstance(X, np.ndarray) and len(np.unique(y)) >= 3


def fit_every_c(options, candidates: list, X: np.ndarray, y: np.ndarray) -> list:
    """One fitted ``LogisticRegression`` per candidate (``{"C": c}``), in order, all solved together on
    ``options.device``."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from featcache.device import resolve_device
    from featcache.solvers.lanes import solve_many

    device = resolve_device(options.device)
    classes, index = np.unique(y, return_inverse=True)
    Cs = [float(params["C"]) for params in candidates]
    features = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=device)
    labels = torch.as_tensor(index, dtype=torch.int64, device=device)
    with torch.no_grad():
        [solutions] = solve_many([[features]], labels, Cs, len(classes))
    fitted = []
    for C, W in zip(Cs, solutions):
        W = W.double().cpu().numpy()
        head = LogisticRegression(C=C, max_iter=2000, random_state=options.seed)
        head.classes_ = classes
        head.coef_ = np.ascontiguousarray(W[:-1].T)
        head.intercept_ = W[-1].copy()
        head.n_features_in_ = X.shape[1]
        head.n_iter_ = np.zeros(1, dtype=np.int32)  # solved by featcache's L-BFGS, not scikit-learn's
        fitted.append(head)
    return fitted
