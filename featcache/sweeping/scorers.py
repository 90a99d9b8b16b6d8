"""Transferability scores: how well features should transfer, from features and labels alone, training nothing.

Inside the sweep (run -> **scorers**), beside the probes, and used by ``featcache rank``. ``SCORERS`` is the
registry ``--score`` offers. An entry scores one combination's standardised training features; the linear
scores (LogME, H-score, its regularised form) are computed from the combination's :class:`Moments` -- its Gram
matrix ``F'F``, ``F'Y`` and per-row norms -- which the sweep takes as blocks of one Gram of every tap, so no
combination passes over the rows again. The sweep writes them as rows of kind ``score`` (``scores.csv``).
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
        from_moments: ``(Moments) -> float``, the same score from the combination's moments alone (a Gram
            block), where the score allows; the sweep and ``rank`` then never pass over the rows for it.
    """

    score: Callable[[np.ndarray, np.ndarray, int], float]
    help: str
    larger_is_better: bool = True
    from_moments: Callable | None = None

    def __post_init__(self):
        if not callable(self.score):
            raise ValueError("a scorer's score must be callable")


SCORERS = Registry("--score")


@dataclass
class Moments:
    """What the linear scores need of features ``F`` (N, D) and one-hot labels ``Y`` (N, C).

    ``gram`` = F'F (D, D), ``cross`` = F'Y (D, C), ``counts`` (C,), ``row_sq`` (N, T): each row's squared norm
    within each of the T taps, ``blocks``: each tap's columns. A combination of taps is :meth:`select`: a block
    of the Gram, no pass over the rows. Where N <= D the rows and their one-hot labels are kept too
    (``rows``, ``onehot``): LogME then decomposes the rows themselves, as its authors do.
    """

    gram: np.ndarray
    cross: np.ndarray
    counts: np.ndarray
    row_sq: np.ndarray
    blocks: list
    rows: np.ndarray | None = None
    onehot: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.row_sq)

    def select(self, which: list[int]) -> Moments:
        """The moments of taps ``which`` side by side (indices into ``blocks``)."""
        columns = np.concatenate([np.arange(self.blocks[k].start, self.blocks[k].stop) for k in which])
        starts = np.cumsum([0] + [self.blocks[k].stop - self.blocks[k].start for k in which])
        return Moments(self.gram[np.ix_(columns, columns)], self.cross[columns], self.counts,
                       self.row_sq[:, which], [slice(int(a), int(b)) for a, b in zip(starts, starts[1:])],
                       None if self.rows is None else self.rows[:, columns], self.onehot)


def moments(parts: list, y, n_classes: int, chunk: int = 8192) -> Moments:
    """The moments of taps ``parts`` (each (N, D_t), NumPy or torch, standardised) side by side, in float64,
    accumulated over row chunks on the parts' device: memory D x D, not N x D in float64."""
    import torch

    parts = [torch.as_tensor(p) for p in parts]
    device = parts[0].device
    widths = [p.shape[1] for p in parts]
    total, n = sum(widths), parts[0].shape[0]
    labels = torch.as_tensor(np.asarray(y.cpu() if hasattr(y, "cpu") else y), dtype=torch.int64, device=device)
    gram = torch.zeros((total, total), dtype=torch.float64, device=device)
    cross = torch.zeros((total, n_classes), dtype=torch.float64, device=device)
    row_sq = torch.zeros((n, len(parts)), dtype=torch.float64, device=device)
    for start in range(0, n, chunk):
        block = torch.cat([p[start:start + chunk].to(torch.float64) for p in parts], dim=1)
        onehot = torch.nn.functional.one_hot(labels[start:start + chunk], n_classes).to(torch.float64)
        gram += block.T @ block
        cross += block.T @ onehot
        col = 0
        for k, width in enumerate(widths):
            row_sq[start:start + chunk, k] = block[:, col:col + width].pow(2).sum(dim=1)
            col += width
    edges = np.cumsum([0] + widths)
    keep = n <= total
    host = labels.cpu().numpy()
    return Moments(gram.cpu().numpy(), cross.cpu().numpy(), np.bincount(host, minlength=n_classes).astype(np.float64),
                   row_sq.cpu().numpy(), [slice(int(a), int(b)) for a, b in zip(edges, edges[1:])],
                   torch.cat([p.to(torch.float64) for p in parts], dim=1).cpu().numpy() if keep else None,
                   np.eye(n_classes)[host] if keep else None)


def scored(name: str, X, y, n_classes: int, stats: Moments | None = None) -> dict:
    """A score row's values: the score of one combination's fit rows (device tensors), or of its moments where
    the score takes them, and the seconds it took."""
    import time

    started = time.perf_counter()
    entry = SCORERS.lookup(name)
    if stats is not None and entry.from_moments is not None:
        value = entry.from_moments(stats)
    else:
        value = entry.score(X.double().cpu().numpy(), y.cpu().numpy(), n_classes)
    return {"score": float(value), "fit_s": time.perf_counter() - started}


def scorers_help() -> str:
    return "; ".join(f"{name}: {entry.help}" for name, entry in SCORERS.items())


def _between(m: Moments) -> np.ndarray:
    """The class means' covariance, from F'Y and the counts (F is centred)."""
    present = m.counts > 0
    means = m.cross[:, present] / m.counts[present]
    return (means * m.counts[present]) @ means.T / m.n


def h_score_moments(m: Moments) -> float:
    cov = m.gram / m.n
    return float(np.trace(np.linalg.pinv(cov, rcond=1e-10, hermitian=True) @ _between(m)))


def h_score(X: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """H-score (Bao et al., "An information-theoretic approach to transferability in task transfer learning",
    ICIP 2019): ``tr(cov(f)^+ cov(E[f | y]))``, the share of the features' variance the class means explain,
    weighted by its inverse covariance. Larger is better; at most ``min(D, n_classes - 1)``."""
    return h_score_moments(moments([X], y, n_classes))


def shrinkage(m: Moments) -> float:
    """Ledoit and Wolf's shrinkage of the features' covariance, as scikit-learn's ``ledoit_wolf_shrinkage``
    computes it for centred features, from the moments alone: F'F, its trace and the rows' fourth moments."""
    n, d = m.n, m.gram.shape[0]
    trace = np.trace(m.gram) / n
    mu = trace / d
    delta_ = float((m.gram ** 2).sum()) / n ** 2
    beta_ = float((m.row_sq.sum(axis=1) ** 2).sum())
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * trace + d * mu ** 2) / d
    beta = min(beta, delta)
    return 0.0 if beta == 0 else float(beta / delta)


def h_score_regularised_moments(m: Moments) -> float:
    d = m.gram.shape[0]
    cov = m.gram / m.n
    a = shrinkage(m)
    shrunk = (1 - a) * cov + a * np.trace(cov) / d * np.eye(d)
    return float(np.trace(np.linalg.solve(shrunk, (1 - a) * _between(m))))


def h_score_regularised(X: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """Regularised H-score (Ibrahim, Ponomareva and Mazumder, "Newer is not always better: rethinking
    transferability metrics, their peculiarities, stability and performance", ECML PKDD 2022): the H-score with
    the features' covariance shrunk towards a multiple of the identity by the Ledoit-Wolf shrinkage ``a``:
    ``tr(((1 - a) cov + a (tr cov / D) I)^-1 (1 - a) cov(E[f | y]))``. Stable where ``cov`` is ill-conditioned
    (N near D, or fewer rows than columns). Larger is better."""
    return h_score_regularised_moments(moments([X], y, n_classes))


def logme_moments(m: Moments) -> float:
    """LogME's fixed-point form from the moments (see :func:`logme`)."""
    n, d = m.n, m.gram.shape[0]
    if m.rows is not None:  # N <= D: the authors' SVD of F itself, its N singular values
        u, s, _ = np.linalg.svd(m.rows, full_matrices=False)
        sigma = s ** 2
        x2s = (u.T @ m.onehot) ** 2
    else:  # N > D: F'F's eigenvectors, the nonzero spectrum only (the authors' truncated_svd), "nonzero" read as
        # numpy's rank rule: the authors' 1e-10 on singular values keeps a rank-deficient Gram's rounding noise
        eig, vectors = np.linalg.eigh(m.gram)
        keep = eig > max(float(eig.max()), 0.0) * max(n, d) * np.finfo(np.float64).eps
        sigma, vectors = eig[keep], vectors[:, keep]
        x2s = (vectors.T @ m.cross) ** 2 / sigma[:, None]  # (U'y)^2 = (V'F'y)^2 / s^2, every class at once
    classes = range(len(m.counts))
    return float(np.mean([_evidence(sigma, x2s[:, c], m.counts[c] - x2s[:, c].sum(), n, d) for c in classes]))


def _evidence(sigma: np.ndarray, x2: np.ndarray, res_x2: float, n: int, d: int) -> float:
    """One class's log evidence per row at the fixed point of ``t = alpha / beta`` (You et al. 2022)."""
    alpha, beta = 1.0, 1.0
    for _ in range(11):
        t = alpha / beta
        gamma = float((sigma / (sigma + t)).sum())
        m_tm = float((sigma * x2 / (t + sigma) ** 2).sum())
        res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + res_x2
        alpha = gamma / (m_tm + 1e-5)
        beta = (n - gamma) / (res2 + 1e-5)
        if abs(alpha / beta - t) / t <= 1e-3:
            break
    evidence = (d / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * sigma))
                - beta / 2.0 * res2 - alpha / 2.0 * m_tm - n / 2.0 * np.log(2 * np.pi))
    return float(evidence / n)


def logme(X: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """LogME (You et al., "LogME: Practical assessment of pre-trained models for transfer learning", ICML 2021)
    in its fixed-point form (You et al., "Ranking and tuning pre-trained models: a new paradigm for exploiting
    model hubs", JMLR 2022, as the authors' code computes it): per class, the log maximum evidence per row of
    a Bayesian linear regression from the features to the class's one-hot column, its prior and noise
    precisions found by iterating on ``t = alpha / beta`` over one decomposition of the features (at most 11
    steps, until ``t`` moves by at most 0.1%); the mean over classes. Larger is better."""
    return logme_moments(moments([X], y, n_classes))


def nleep(X: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """NLEEP (Li et al., "Ranking neural checkpoints", CVPR 2021): LEEP with a Gaussian mixture in place of a
    source classifier. The features are reduced by PCA to the components holding 80% of their variance, a
    mixture of ``5 x n_classes`` diagonal Gaussians is fitted (seeded: the score is deterministic), and its
    posteriors ``p(v | x)`` stand for the source-label probabilities: the mean of ``log sum_v p(y | v) p(v | x)``.
    At most 0; larger (nearer 0) is better."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    reduced = PCA(n_components=0.8, svd_solver="full", random_state=0).fit_transform(X) if X.shape[1] > 1 else X
    components = min(5 * n_classes, len(X) // 2)
    mixture = GaussianMixture(components, covariance_type="diag", random_state=0, reg_covar=1e-4).fit(reduced)
    return leep_of(mixture.predict_proba(reduced), y, n_classes)


def leep_of(theta: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """LEEP (Nguyen et al., "LEEP: a new measure to evaluate transferability of learned representations", ICML
    2020) of source-label probabilities ``theta`` (N, Z): the empirical ``p(y | z)`` from the joint
    ``mean theta`` per class, then the mean of ``log sum_z p(y_i | z) theta_iz``. At most 0; larger is better."""
    joint = np.zeros((n_classes, theta.shape[1]))
    np.add.at(joint, y, theta)
    joint /= len(y)
    conditional = joint / np.clip(joint.sum(axis=0, keepdims=True), 1e-300, None)  # p(y | z)
    return float(np.mean(np.log(np.clip((theta * conditional[y]).sum(axis=1), 1e-300, None))))


SCORERS.register("logme")(Scorer(logme, "LogME, fixed-point form (You et al. 2021, 2022), log evidence per row, "
                                        "larger is better", from_moments=logme_moments))
SCORERS.register("hscore")(Scorer(h_score, "H-score (Bao et al. 2019), larger is better", from_moments=h_score_moments))
SCORERS.register("hscore_reg")(Scorer(h_score_regularised, "regularised H-score, Ledoit-Wolf shrinkage (Ibrahim et al. "
                                                           "2022), larger is better",
                                      from_moments=h_score_regularised_moments))
SCORERS.register("nleep")(Scorer(nleep, "NLEEP, LEEP over a Gaussian mixture (Li et al. 2021), at most 0, larger is "
                                        "better"))
