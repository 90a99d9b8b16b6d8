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
from featcache.sweeping.discriminant import etran_combine, etran_parts, ncti_combine, ncti_parts, sfda, softmax
from featcache.sweeping.moments import Moments, moments


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
        reads_logits: the score reads a source classifier's output: ``X`` is then the ``logits`` tap as stored (not
            standardised), one per backbone (extracted with ``--logits``).
        parts: a score defined relative to the candidates it compares (NCTI, ETran: each term min-max scaled over
            them): ``score`` returns one value per named part, and ``combine`` turns the parts of every candidate
            compared, an array (candidates, parts), into their scores. A table holds the parts and combines them
            over its own rows, so such a score is comparable only within one table.
    """

    score: Callable[[np.ndarray, np.ndarray, int], float]
    help: str
    larger_is_better: bool = True
    from_moments: Callable | None = None
    reads_logits: bool = False
    parts: tuple[str, ...] = ()
    combine: Callable[[np.ndarray], np.ndarray] | None = None

    def __post_init__(self):
        if not callable(self.score):
            raise ValueError("a scorer's score must be callable")
        if bool(self.parts) != (self.combine is not None):
            raise ValueError("a scorer with parts needs its combine, and only such a scorer has one")


def combined(name: str, parts) -> np.ndarray:
    """The scores of candidates compared together: each candidate's stored value for a plain score, or for a
    score with parts (one list per candidate; None where it failed) the combination over the candidates that
    have them."""
    entry = SCORERS.lookup(name)
    if not entry.parts:
        return np.array([np.nan if v is None else float(v) for v in parts], dtype=np.float64)
    out = np.full(len(parts), np.nan)
    have = [i for i, v in enumerate(parts) if isinstance(v, (list, tuple)) and len(v) == len(entry.parts)
            and all(isinstance(x, (int, float)) and np.isfinite(x) for x in v)]
    if have:
        out[have] = entry.combine(np.array([parts[i] for i in have], dtype=np.float64))
    return out


def separates(values, tolerance: float = 1e-6) -> bool:
    """Whether a score tells candidates apart at all: False when every finite value lies within ``tolerance`` of
    the others (the H-score of taps wider than the rows, 1.0000 for every one), or fewer than two are finite."""
    finite = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    return len(finite) >= 2 and float(finite.max() - finite.min()) > tolerance


SCORERS = Registry("--score")


def scored(name: str, X, y, n_classes: int, stats: Moments | None = None) -> dict:
    """A score row's values: the score of one combination's fit rows (device tensors), or of its moments where
    the score takes them, and the seconds it took."""
    import time

    started = time.perf_counter()
    entry = SCORERS.lookup(name)
    spent = 0.0
    if stats is not None and entry.from_moments is not None:
        value = entry.from_moments(stats)
        spent = stats.__dict__.pop("spent", 0.0)  # its decomposition, made ahead (decompose): the first score's
    else:
        value = entry.score(X.double().cpu().numpy(), y.cpu().numpy(), n_classes)
    if entry.parts:  # combined over the candidates of a table, which holds the parts
        return {"parts": [float(v) for v in value], "fit_s": time.perf_counter() - started + spent}
    return {"score": float(value), "fit_s": time.perf_counter() - started + spent}


def scorers_help() -> str:
    return "; ".join(f"{name}: {entry.help}" for name, entry in SCORERS.items())


def _rank_rule(eig: np.ndarray, m: Moments) -> np.ndarray:
    """The nonzero part of a spectrum, by numpy's rank rule."""
    return eig > max(float(eig.max()), 0.0) * max(m.n, m.d) * np.finfo(np.float64).eps


def h_score_moments(m: Moments) -> float:
    # tr(cov^+ cov(E[f|y])) = sum over classes of |U_r' y_c|^2 / n_c: the class indicators' share in the
    # features' column space (U_r: its orthonormal basis), from either decomposition -- or, where the covariance
    # is comfortably invertible (every eigenvalue kept), sum_c b_c' (F'F)^-1 b_c / n_c by one Cholesky solve
    solved = m.solved()
    if solved is not None:
        return solved
    eig, x2 = m.spectrum()
    keep = _rank_rule(eig, m)
    present = m.counts > 0
    return float((x2[keep][:, present] / m.counts[present]).sum())


def h_score(X: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """H-score (Bao et al., "An information-theoretic approach to transferability in task transfer learning",
    ICIP 2019): ``tr(cov(f)^+ cov(E[f | y]))``, the share of the features' variance the class means explain,
    weighted by its inverse covariance. Larger is better; at most ``min(D, n_classes - 1)``."""
    return h_score_moments(moments([X], y, n_classes))


def shrinkage(m: Moments) -> float:
    """Ledoit and Wolf's shrinkage of the features' covariance, as scikit-learn's ``ledoit_wolf_shrinkage``
    computes it for centred features, from the moments alone: ||F'F||^2 (= ||FF'||^2), its trace and the rows'
    fourth moments."""
    n, d = m.n, m.d
    square = m.gram if m.kernels is None else m.kernel
    trace = np.trace(square) / n
    mu = trace / d
    delta_ = float((square ** 2).sum()) / n ** 2
    beta_ = float((m.row_sq.sum(axis=1) ** 2).sum())
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * trace + d * mu ** 2) / d
    beta = min(beta, delta)
    return 0.0 if beta == 0 else float(beta / delta)


def h_score_regularised_moments(m: Moments) -> float:
    # with F'F = V diag(e) V' (or FF' = U diag(e) U'), ((1 - a) F'F / N + lam I)^-1 (1 - a) F'PF / N has the trace
    # (1 - a) / N sum_i e_i q_i / ((1 - a) e_i / N + lam), q_i = sum_c (u_i' y_c)^2 / n_c, lam = a tr(cov) / D:
    # (1 - a) / N sum_c b_c' ((1 - a) F'F / N + lam I)^-1 b_c / n_c, one Cholesky solve where it is well posed
    a = shrinkage(m)
    square = m.gram if m.kernels is None else m.kernel
    lam = a * np.trace(square) / m.n / m.d
    solved = m.solved((1 - a) / m.n, lam)
    if solved is not None:
        return float((1 - a) / m.n * solved)
    eig, x2 = m.spectrum()
    present = m.counts > 0
    q = (x2[:, present] / m.counts[present]).sum(axis=1)
    denominator = (1 - a) * eig / m.n + lam
    keep = denominator > 0
    return float((1 - a) / m.n * (eig[keep] * q[keep] / denominator[keep]).sum())


def h_score_regularised(X: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """Regularised H-score (Ibrahim, Ponomareva and Mazumder, "Newer is not always better: rethinking
    transferability metrics, their peculiarities, stability and performance", ECML PKDD 2022): the H-score with
    the features' covariance shrunk towards a multiple of the identity by the Ledoit-Wolf shrinkage ``a``:
    ``tr(((1 - a) cov + a (tr cov / D) I)^-1 (1 - a) cov(E[f | y]))``. Stable where ``cov`` is ill-conditioned
    (N near D, or fewer rows than columns). Larger is better."""
    return h_score_regularised_moments(moments([X], y, n_classes))


def logme_moments(m: Moments) -> float:
    """LogME's fixed-point form from the moments (see :func:`logme`)."""
    eig, x2s = m.spectrum()
    if m.kernels is None:  # N > D: the nonzero spectrum only (the authors' truncated_svd), by numpy's rank rule
        keep = _rank_rule(eig, m)  # (the authors' 1e-10 on singular values keeps a rank-deficient Gram's noise)
        eig, x2s = eig[keep], x2s[keep]
    # N <= D: FF''s N eigenvalues, the authors' N singular values squared
    return float(np.mean([_evidence(eig, x2s[:, c], m.counts[c] - x2s[:, c].sum(), m.n, m.d)
                          for c in range(len(m.counts))]))


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


def leep(logits: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """LEEP (Nguyen et al., ICML 2020) of a source classifier's ``logits`` (N, Z): :func:`leep_of` its softmax.
    At most 0; larger is better."""
    return leep_of(softmax(logits), np.asarray(y), n_classes)


def nce(logits: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """NCE, negative conditional entropy (Tran et al., "Transferability and hardness of supervised classification
    tasks", ICCV 2019): ``-H(Y | Z)`` of the target labels given the source classifier's hard labels ``Z =
    argmax logits``, from their empirical joint: ``sum_{y,z} p(y, z) log p(y | z)``. At most 0; larger is better."""
    z = np.asarray(logits).argmax(axis=1)
    y = np.asarray(y)
    joint = np.zeros((n_classes, np.asarray(logits).shape[1]))
    np.add.at(joint, (y, z), 1.0)
    joint /= len(y)
    marginal = joint.sum(axis=0, keepdims=True)
    seen = joint > 0
    return float(np.sum(joint[seen] * np.log((joint / np.where(marginal > 0, marginal, 1.0))[seen])))


SCORERS.register("logme")(Scorer(logme, "LogME, fixed-point form (You et al. 2021, 2022), log evidence per row, "
                                        "larger is better", from_moments=logme_moments))
SCORERS.register("hscore")(Scorer(h_score, "H-score (Bao et al. 2019), larger is better", from_moments=h_score_moments))
SCORERS.register("hscore_reg")(Scorer(h_score_regularised, "regularised H-score, Ledoit-Wolf shrinkage (Ibrahim et al. "
                                                           "2022), larger is better",
                                      from_moments=h_score_regularised_moments))
SCORERS.register("nleep")(Scorer(nleep, "NLEEP, LEEP over a Gaussian mixture (Li et al. 2021), at most 0, larger is "
                                        "better"))
SCORERS.register("leep")(Scorer(leep, "LEEP (Nguyen et al. 2020) of the source classifier's predictions (needs "
                                      "--logits), at most 0, larger is better", reads_logits=True))
SCORERS.register("nce")(Scorer(nce, "NCE (Tran et al. 2019), -H(target | source label), of the source classifier's hard "
                                    "labels (needs --logits), at most 0, larger is better", reads_logits=True))
SCORERS.register("sfda")(Scorer(sfda, "SFDA, self-challenging Fisher discriminant (Shao et al. 2022), mean posterior of "
                                      "the true class after ConfMix, 0 to 1, larger is better"))
SCORERS.register("ncti")(Scorer(ncti_parts, "NCTI, neural-collapse transferability (Wang et al. 2023), three terms "
                                            "min-max scaled over the taps compared (comparable within one table), "
                                            "larger is better", parts=("seli", "ncc", "vc"), combine=ncti_combine))
SCORERS.register("etran")(Scorer(etran_parts, "ETran, energy + LDA terms (Gholami et al. 2023), min-max scaled over "
                                              "the taps compared (comparable within one table), larger is better",
                                 parts=("energy", "lda"), combine=etran_combine))
