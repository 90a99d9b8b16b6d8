"""Scores that fit a class-conditional model to the features: SFDA, NCTI and ETran, each as its authors' code
computes it (``tests/test_scorers.py`` names the code and checks equality).

Inside the sweep's scores (scorers -> **discriminant**): functions of one combination's standardised rows;
:mod:`~featcache.sweeping.scorers` registers them. NCTI and ETran are defined over the candidates compared: a
function here gives one candidate's parts, its ``*_combine`` the scores of all of them.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _present(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The classes present in ``y`` renumbered 0..K-1 (the authors' ``np.unique``), their counts and priors."""
    _, y = np.unique(y, return_inverse=True)
    counts = np.bincount(y).astype(np.float64)
    return y, counts, counts / len(y)


def _class_means(X: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    means = np.zeros((len(counts), X.shape[1]))
    np.add.at(means, y, X)
    return means / counts[:, None]


def _largest_eigenvalue(A: np.ndarray, steps: int = 3) -> float:
    """SFDA's estimate of the largest eigenvalue of a symmetric ``A``: ``steps`` double power iterations from its
    row sums, then the Rayleigh-like product the authors' ``iterative_A`` returns."""
    x = A.sum(axis=1)
    for _ in range(steps):
        t = A @ x
        v = t / np.linalg.norm(t)
        t = A @ v
        x = t / np.linalg.norm(t)
    return float(x @ A @ v)


def _shrunk_lda_proba(X: np.ndarray, y: np.ndarray, counts: np.ndarray, priors: np.ndarray,
                      shrinkage: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """SFDA's regularised Fisher classifier: the within-class scatter ``Sw = sum_c p_c cov_c`` shrunk towards
    ``tr(Sw) / D`` by ``a`` (given, or ``max(exp(-5 lambda_max(Sw)), 1e-10)``), and the posteriors
    ``softmax(X Sw_a^-1 mu' - diag(mu Sw_a^-1 mu') / 2 + log p)``. The authors form them through the generalised
    eigenvectors V of (Sb, Sw_a); since V V' = Sw_a^-1 for those, one solve gives the same. Returns (posteriors,
    class means, a)."""
    means = _class_means(X, y, counts)
    centred = X - means[y]
    within = centred.T @ centred / len(X)  # sum_c p_c * (biased) cov_c
    if shrinkage is None:
        shrinkage = max(float(np.exp(-5 * _largest_eigenvalue(within))), 1e-10)
    d = within.shape[0]
    shrunk = (1 - shrinkage) * within
    shrunk.flat[::d + 1] += shrinkage * np.trace(within) / d
    coef = np.linalg.solve(shrunk, means.T).T  # mu Sw_a^-1 (Sw_a symmetric)
    logits = X @ coef.T - 0.5 * np.einsum("cd,cd->c", means, coef) + np.log(priors)
    return softmax(logits), means, shrinkage


def sfda(X: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """SFDA (Shao et al., "Not all models are equal: predicting model transferability in a self-challenging Fisher
    space", ECCV 2022; as the authors' code, TencentARC/SFDA ``SFDA_Score``, computes it): a shrinkage Fisher
    classifier (the shrinkage set by the within-class scatter's largest eigenvalue), its posteriors softened by a
    second softmax; ConfMix moves each row towards the mean of the other classes' means by one minus its softened
    probability of its own class; the same classifier, with the same shrinkage, fitted again on the mixed rows;
    the mean posterior of each row's class. Between 0 and 1; larger is better."""
    y, counts, priors = _present(np.asarray(y))
    X = np.array(X, dtype=np.float64)
    proba, means, shrinkage = _shrunk_lda_proba(X, y, counts, priors, None)
    soft = softmax(proba)[np.arange(len(y)), y][:, None]
    k = len(counts)
    others = (means.sum(axis=0, keepdims=True) - means) / max(k - 1, 1)
    mixed = soft * X + (1 - soft) * others[y]
    proba, _, _ = _shrunk_lda_proba(mixed, y, counts, priors, shrinkage)
    return float(proba[np.arange(len(y)), y].mean())


def _min_max(values: np.ndarray) -> np.ndarray:
    """Each column scaled to [0, 1] over the candidates, as the authors' NCTI and ETran scripts do; a column
    whose candidates are all equal (one candidate) is 0."""
    low, span = values.min(axis=0), values.max(axis=0) - values.min(axis=0)
    return np.divide(values - low, span, out=np.zeros_like(values), where=span > 0)


def ncti_parts(X: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """NCTI's three terms (Wang et al., "How far pre-trained models are from neural collapse on the target dataset
    informs their transferability", ICCV 2023; as the authors' code, BUserName/NCTI ``NCTI_Score``, computes them):
    the features reduced by PCA to 64 components (fewer where the rows or columns are fewer); scikit-learn's linear
    discriminant analysis on them, with the shrinkage ``exp(-sum of the 32 largest PCA variances)`` (its SVD solver
    where that falls under 1e-10); **seli**, the nuclear norm of the centred discriminant projection (within-class
    variability collapse); **ncc**, the mean posterior of each row's class (nearest-class-centre separability);
    **vc**, the log of the sum over classes of the nuclear norms of their rows' posteriors."""
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    y, counts, _ = _present(np.asarray(y))
    components = min(64, X.shape[0], X.shape[1])
    pca = PCA(n_components=components, svd_solver="full")
    reduced = pca.fit_transform(X)
    shrinkage = max(float(np.exp(-pca.explained_variance_[:32].sum())), 1e-10)
    lda = LinearDiscriminantAnalysis(solver="svd") if shrinkage == 1e-10 else \
        LinearDiscriminantAnalysis(solver="eigen", shrinkage=shrinkage)
    projected = lda.fit_transform(reduced, y)
    projected = projected - projected.mean(axis=0, keepdims=True)
    seli = float(np.linalg.norm(projected, ord="nuc"))
    proba = lda.predict_proba(reduced)
    ncc = float(proba[np.arange(len(y)), y].mean())
    vc = float(np.log(sum(np.linalg.norm(proba[y == c], ord="nuc") for c in range(len(counts)))))
    return np.array([seli, ncc, vc])


def ncti_combine(parts: np.ndarray) -> np.ndarray:
    """NCTI over the candidates compared: ``minmax(seli) + minmax(ncc) - minmax(vc)`` (the authors' script)."""
    scaled = _min_max(parts)
    return scaled[:, 0] + scaled[:, 1] - scaled[:, 2]


def etran_parts(X: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """ETran's two classification terms (Gholami et al., "ETran: energy-based transferability estimation", ICCV
    2023; as the authors' code, mgholamikn/ETran ``Energy_Score`` and ``LDA_Score``, computes them): the **energy**
    term, the mean of ``logsumexp`` over each row's features for the lowest-scoring 0.5% of the rows (at least one
    row; here of the standardised features every featcache score reads, where the authors' read them as
    extracted), and the **lda** term, the mean posterior of each row's class under the authors' LDA. That LDA takes
    the orthonormal eigenvectors V of ``Sw^-1 Sb`` and the coefficients ``mu V V'``; V V' = I, so its posteriors
    are ``softmax(X mu' - |mu|^2 / 2 + log p)``, computed so."""
    y, counts, priors = _present(np.asarray(y))
    X = np.asarray(X, dtype=np.float64)
    top = X.max(axis=1, keepdims=True)
    energy = (top[:, 0] + np.log(np.exp(X - top).sum(axis=1)))
    lowest = np.sort(energy)[:max(5 * len(energy) // 1000, 1)]
    means = _class_means(X, y, counts)
    proba = softmax(X @ means.T - 0.5 * (means ** 2).sum(axis=1) + np.log(priors))
    return np.array([float(lowest.mean()), float(proba[np.arange(len(y)), y].mean())])


def etran_combine(parts: np.ndarray) -> np.ndarray:
    """ETran over the candidates compared: ``0.15 minmax(energy) + 0.85 minmax(lda)`` (the authors' ``tw.py``)."""
    scaled = _min_max(parts)
    return 0.15 * scaled[:, 0] + 0.85 * scaled[:, 1]
