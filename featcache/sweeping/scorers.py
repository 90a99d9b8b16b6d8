"""Scores that train no head: how well a combination's features should transfer, from features and labels alone.

Inside the sweep (run -> **scorers**), beside the probes. ``SCORERS`` is the registry the sweep's
``--score`` offers: an entry is a function of one combination's standardised training features
and labels, and says which way is better. The sweep computes each asked score for every
combination and seed on the same rows the probes fit on, and writes them as rows of kind
``score`` (``scores.csv``), beside the probes' table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from featcache.registry import Registry


@dataclass(frozen=True)
class Scorer:
    """A transferability score.

    Args:
        score: ``score(X, y, n_classes) -> float``; ``X`` float64 (N, D), standardised per tap on these rows;
            ``y`` int64 (N,) in ``range(n_classes)``.
        help: one line for ``--help``: what it is, its paper, and what larger means.
        larger_is_better: False for a score where smaller means better transfer.
    """

    score: Callable[[np.ndarray, np.ndarray, int], float]
    help: str
    larger_is_better: bool = True

    def __post_init__(self):
        if not callable(self.score):
            raise ValueError("a scorer's score must be callable")


SCORERS = Registry("--score")


def scored(name: str, X, y, n_classes: int) -> dict:
    """A score row's values: the score of one combination's fit rows (device tensors) and the seconds it took."""
    import time

    started = time.perf_counter()
    value = SCORERS.lookup(name).score(X.double().cpu().numpy(), y.cpu().numpy(), n_classes)
    return {"score": float(value), "fit_s": time.perf_counter() - started}


def scorers_help() -> str:
    return "; ".join(f"{name}: {entry.help}" for name, entry in SCORERS.items())


def h_score(X: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """H-score (Bao et al., "An information-theoretic approach to transferability in task transfer learning",
    ICIP 2019): ``tr(cov(f)^+ cov(E[f | y]))``, the share of the features' variance the class means explain,
    weighted by its inverse covariance. Larger is better; at most ``min(D, n_classes - 1)``."""
    X = X - X.mean(axis=0)
    cov = X.T @ X / len(X)
    means = np.zeros_like(X)
    for c in range(n_classes):
        rows = y == c
        if rows.any():
            means[rows] = X[rows].mean(axis=0)
    between = means.T @ means / len(X)
    return float(np.trace(np.linalg.pinv(cov, rcond=1e-10, hermitian=True) @ between))


def logme(X: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """LogME (You et al., "LogME: Practical assessment of pre-trained models for transfer learning", ICML 2021):
    the mean over classes of the log maximum evidence, per row, of a Bayesian linear regression from the
    features to the class's one-hot column, its prior and noise precisions found by the paper's iteration
    (at most 11 steps, stopping when their ratio moves by less than 1%). Larger is better."""
    N, D = X.shape
    eig, vectors = np.linalg.eigh(X.T @ X)  # one decomposition serves every class
    eig = np.clip(eig, 0.0, None)
    total = 0.0
    for c in range(n_classes):
        target = (y == c).astype(np.float64)
        projected = vectors.T @ (X.T @ target)
        alpha, beta, eps = 1.0, 1.0, 1e-5
        ratio = alpha / beta
        for _ in range(11):
            gamma = float((beta * eig / (alpha + beta * eig)).sum())
            m = vectors @ (projected * beta / (alpha + beta * eig))
            alpha_de = float(m @ m)
            beta_de = float(((target - X @ m) ** 2).sum())
            alpha = gamma / (alpha_de + eps)
            beta = (N - gamma) / (beta_de + eps)
            if abs(alpha / beta - ratio) / ratio < 0.01:
                break
            ratio = alpha / beta
        evidence = (D / 2 * np.log(alpha) + N / 2 * np.log(beta) - 0.5 * np.log(alpha + beta * eig).sum()
                    - beta / 2 * (beta_de + eps) - alpha / 2 * (alpha_de + eps) - N / 2 * np.log(2 * np.pi))
        total += evidence / N
    return float(total / n_classes)


SCORERS.register("hscore")(Scorer(h_score, "H-score (Bao et al. 2019), larger is better"))
SCORERS.register("logme")(Scorer(logme, "LogME (You et al. 2021), log evidence per row, larger is better"))
