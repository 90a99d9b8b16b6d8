"""fuse-train's linear SVM solved by the sweep's exact Newton steps, as a scikit-learn ``LinearSVC``.

Flow: heads -> **svm** -> solvers.path. ``LinearSVC`` (liblinear's dual coordinate descent) did not finish one C in
300 s on 10,000 x 1,792 CIFAR-shaped rows that no hyperplane separates (``benchmarks/probes.py``'s features), and a
kept svm run fits four times (the chosen C, then three folds and all rows for its calibrated probabilities).
:class:`NewtonLinearSVC` is ``LinearSVC`` with ``fit`` solved by :func:`featcache.solvers.path.solve_path`: the same
objective (one-vs-rest squared hinge, the intercept penalised as liblinear's constant feature of value 1), solved
exactly by Newton steps, so ``CalibratedClassifierCV`` and every scikit-learn method use it unchanged. Two classes,
sample weights, sparse input or other settings than the defaults fall back to liblinear.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=1)
def newton_class():
    from sklearn.svm import LinearSVC

    class NewtonLinearSVC(LinearSVC):
        """``LinearSVC`` whose ``fit`` is featcache's exact Newton solver where it applies (see the module)."""

        def fit(self, X, y, sample_weight=None):
            if not self._newton(X, y, sample_weight):
                return super().fit(X, y, sample_weight=sample_weight)
            import torch

            from featcache.solvers.path import solve_path

            classes, index = np.unique(y, return_inverse=True)
            features = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32))
            with torch.no_grad():
                [W] = solve_path(features, torch.as_tensor(index, dtype=torch.int64), [float(self.C)], "svm",
                                 len(classes))
            W = W.double().numpy()
            self.classes_, self.coef_, self.intercept_ = classes, np.ascontiguousarray(W[:-1].T), W[-1].copy()
            self.n_features_in_, self.n_iter_ = X.shape[1], 0
            return self

        def _newton(self, X, y, sample_weight) -> bool:
            defaults = (self.penalty == "l2" and self.loss == "squared_hinge" and self.fit_intercept
                        and self.intercept_scaling == 1 and self.multi_class == "ovr" and self.class_weight is None)
            return (defaults and sample_weight is None and isinstance(X, np.ndarray) and X.ndim == 2
                    and len(np.unique(y)) >= 3)

    NewtonLinearSVC.__module__ = __name__
    NewtonLinearSVC.__qualname__ = "NewtonLinearSVC"
    return NewtonLinearSVC


def __getattr__(name: str):
    """``featcache.fuse.svm.NewtonLinearSVC``: made on first use, so importing this module loads no scikit-learn
    (skops finds the class by this name when a saved head is loaded)."""
    if name == "NewtonLinearSVC":
        return newton_class()
    raise AttributeError(name)
