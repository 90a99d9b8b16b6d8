"""The scores that train no head against their definitions, computed another way."""

import numpy as np
import pytest

from featcache.sweeping.scorers import SCORERS, h_score, logme


def data(n=120, d=10, classes=3, seed=0, signal=1.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    X = rng.normal(size=(n, d)) + signal * np.eye(classes, d)[y] * 3
    return (X - X.mean(0)) / X.std(0), y


def h_score_by_definition(X, y, classes):
    """tr(cov(f)^+ cov(E[f|y])) with NumPy's covariance, the class means row by row."""
    means = np.stack([X[y == c].mean(0) for c in range(classes)])[y]
    return np.trace(np.linalg.pinv(np.cov(X.T, bias=True)) @ np.cov(means.T, bias=True))


def logme_by_definition(F, y, classes):
    """LogME as the paper writes it: A = alpha I + beta F'F solved directly, log det A by slogdet."""
    N, D = F.shape
    total = 0.0
    for c in range(classes):
        t = (y == c).astype(float)
        alpha, beta = 1.0, 1.0
        s = np.linalg.eigvalsh(F.T @ F)
        for _ in range(11):
            A = alpha * np.eye(D) + beta * F.T @ F
            m = beta * np.linalg.solve(A, F.T @ t)
            gamma = np.sum(beta * s / (alpha + beta * s))
            a_de, b_de = m @ m, np.sum((t - F @ m) ** 2)
            old = alpha / beta
            alpha, beta = gamma / (a_de + 1e-5), (N - gamma) / (b_de + 1e-5)
            if abs(alpha / beta - old) / old < 0.01:
                break
        A = alpha * np.eye(D) + beta * F.T @ F
        evidence = (D / 2 * np.log(alpha) + N / 2 * np.log(beta) - 0.5 * np.linalg.slogdet(A)[1]
                    - beta / 2 * (b_de + 1e-5) - alpha / 2 * (a_de + 1e-5) - N / 2 * np.log(2 * np.pi))
        total += evidence / N
    return total / classes


@pytest.mark.parametrize(("n", "d", "classes"), [(120, 10, 3), (40, 60, 2), (300, 8, 10)],
                         ids=["N>D", "N<D", "10 classes"])
def test_scores_match_their_definitions(n, d, classes):
    X, y = data(n, d, classes)
    assert h_score(X, y, classes) == pytest.approx(h_score_by_definition(X, y, classes), rel=1e-6)
    assert logme(X, y, classes) == pytest.approx(logme_by_definition(X, y, classes), rel=1e-6)


def test_rank_deficient_features_and_larger_means_better():
    X, y = data()
    doubled = np.hstack([X, X])  # rank 10 in 20 columns
    assert np.isfinite(logme(doubled, y, 3)) and h_score(doubled, y, 3) == pytest.approx(h_score(X, y, 3), rel=1e-6)
    noise, _ = data(signal=0.0)
    for name, entry in SCORERS.items():
        assert entry.larger_is_better
        assert entry.score(X, y, 3) > entry.score(noise, y, 3), name  # features that hold the labels score higher
