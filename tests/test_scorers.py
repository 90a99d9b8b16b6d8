"""The scores that train no head against their definitions, computed another way."""

import numpy as np
import pytest

import featcache.sweeping.moments as gram
from featcache.sweeping.scorers import SCORERS, h_score, h_score_regularised, leep_of, logme, nleep


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
    """LogME's fixed point as the papers write it: A = alpha I + beta F'F solved directly, m = beta A^-1 F'y,
    log det A by slogdet; the spectrum the authors' code sums over (N > D: F'F's nonzero eigenvalues; N <= D:
    F's N singular values squared), so log det A is taken less (D - K) log alpha."""
    N, D = F.shape
    spectrum = np.linalg.eigvalsh(F.T @ F) if N > D else np.linalg.svd(F, compute_uv=False) ** 2
    if N > D:  # the nonzero spectrum, by numpy's rank rule
        spectrum = spectrum[spectrum > spectrum.max() * max(N, D) * np.finfo(float).eps]
    total = 0.0
    for c in range(classes):
        t = (y == c).astype(float)
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            old = alpha / beta
            A = alpha * np.eye(D) + beta * F.T @ F
            m = beta * np.linalg.solve(A, F.T @ t)
            gamma = np.sum(beta * spectrum / (alpha + beta * spectrum))
            m_tm, res2 = m @ m, np.sum((t - F @ m) ** 2)
            alpha, beta = gamma / (m_tm + 1e-5), (N - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - old) / old <= 1e-3:
                break
        log_det = np.linalg.slogdet(alpha * np.eye(D) + beta * F.T @ F)[1] - (D - len(spectrum)) * np.log(alpha)
        evidence = (D / 2 * np.log(alpha) + N / 2 * np.log(beta) - 0.5 * log_det - beta / 2 * res2
                    - alpha / 2 * m_tm - N / 2 * np.log(2 * np.pi))
        total += evidence / N
    return total / classes


def h_score_regularised_by_definition(X, y, classes):
    """scikit-learn's Ledoit-Wolf estimate of the covariance and its shrinkage a, then the paper's formula."""
    from sklearn.covariance import ledoit_wolf

    shrunk, a = ledoit_wolf(X, assume_centered=True)
    means = np.stack([X[y == c].mean(0) for c in range(classes)])[y]
    return np.trace(np.linalg.solve(shrunk, (1 - a) * np.cov(means.T, bias=True)))


def leep_by_definition(theta, y, classes):
    """Nguyen et al.'s equations, a loop per sum."""
    n, z = theta.shape
    joint = np.array([[sum(theta[i, k] for i in range(n) if y[i] == c) / n for k in range(z)] for c in range(classes)])
    cond = joint / joint.sum(axis=0)
    return np.mean([np.log(sum(cond[y[i], k] * theta[i, k] for k in range(z))) for i in range(n)])


@pytest.fixture(params=["small", "large"])
def route(request, monkeypatch):
    """Both ways to the same numbers: numpy's eigh alone (a small matrix), or -- as from 1,024 columns or rows --
    a Cholesky solve for the H-scores and the spectrum by tridiagonal form, MRRR and the reflections."""
    if request.param == "large":
        monkeypatch.setattr(gram, "LARGE", 3)
    return request.param


@pytest.mark.parametrize(("n", "d", "classes"), [(120, 10, 3), (40, 60, 2), (300, 8, 10), (200, 30, 2),
                                               (400, 120, 100)],
                         ids=["N>D", "N<D", "10 classes", "2 classes", "100 classes"])
def test_scores_match_their_definitions(n, d, classes, route):
    X, y = data(n, d, classes)
    assert h_score(X, y, classes) == pytest.approx(h_score_by_definition(X, y, classes), rel=1e-6)
    assert logme(X, y, classes) == pytest.approx(logme_by_definition(X, y, classes), rel=1e-6)
    assert h_score_regularised(X, y, classes) == pytest.approx(h_score_regularised_by_definition(X, y, classes),
                                                               rel=1e-6)


@pytest.mark.parametrize(("n", "d"), [(150, 12), (30, 90)], ids=["Gram blocks", "summed kernels"])
def test_a_combinations_scores_from_a_block_of_one_gram_equal_its_own(n, d):
    """Each pair from the moments of all the taps: a block of one Gram; with fewer rows than columns a sum of
    the taps' kernels, or -- a pair narrower than its rows -- a block of the narrow taps' Gram."""
    from featcache.sweeping.moments import moments

    X, y = data(n, d, 3)
    parts = [X[:, : d // 9], X[:, d // 9 : d // 4], X[:, d // 4 :]]
    every = moments(parts, y, 3)
    assert (every.kernels is not None) == (n < d)
    for which in ([0, 1], [0, 2], [1, 2]):
        block = every.select(which)
        assert (block.kernels is None) == (n > d or sum(parts[k].shape[1] for k in which) < n)
        for name in ("logme", "hscore", "hscore_reg"):
            entry = SCORERS[name]
            assert entry.from_moments(block) == pytest.approx(
                entry.score(np.hstack([parts[k] for k in which]), y, 3), rel=1e-9), (name, which)


def test_decompositions_made_ahead_in_threads_equal_those_made_in_turn():
    """The sweep decomposes combinations ahead, several at once with one BLAS thread each: the same scores, and
    the seconds it took counted once, in the combination's first score."""
    from featcache.sweeping.moments import decompose, moments
    from featcache.sweeping.scorers import scored

    X, y = data(60, 40, 3)
    parts = [X[:, k : k + 10] for k in range(0, 40, 10)]
    every = moments(parts, y, 3)
    combos = [[0], [1], [0, 1], [2, 3], [1, 3]]
    ahead = [every.select(c) for c in combos]
    decompose(ahead, 2)
    assert all(block.spent > 0 and block._spectrum is not None for block in ahead)
    for which, block in zip(combos, ahead):
        for name in ("logme", "hscore", "hscore_reg"):
            expected = SCORERS[name].from_moments(every.select(which))
            assert SCORERS[name].from_moments(block) == pytest.approx(expected, rel=1e-10), (name, which)
    spent = ahead[0].spent
    assert scored("logme", None, y, 3, ahead[0])["fit_s"] >= spent  # counted in the first score ...
    assert "spent" not in vars(ahead[0])  # ... and only there
    alone = [every.select([0])]
    decompose(alone, 1)  # one worker, or one combination: left to be made in turn
    assert getattr(alone[0], "_spectrum", None) is None


def test_leep_and_nleep():
    rng = np.random.default_rng(1)
    theta = rng.dirichlet(np.ones(5), size=30)
    y = np.arange(30) % 3
    assert leep_of(theta, y, 3) == pytest.approx(leep_by_definition(theta, y, 3), rel=1e-9)
    X, y = data(150, 10, 3)
    assert nleep(X, y, 3) == nleep(X, y, 3) <= 0  # seeded: the same every run


def test_the_large_matrix_steps_equal_numpys_eigh():
    """The spectrum by tridiagonal form + MRRR + reflections, and the eigenvectors it forms on demand, equal
    numpy's eigh; so does torch's (the route where the rows are on a GPU)."""
    rng = np.random.default_rng(3)
    A = rng.normal(size=(90, 40)) * np.geomspace(1, 1e3, 40)
    square, columns = A.T @ A, rng.normal(size=(40, 4))
    eig, vectors = np.linalg.eigh(square)
    got, projected, of = gram.eigh_projected(square, columns, tridiagonal_from=0)
    assert np.allclose(got, eig, rtol=1e-12, atol=1e-9 * eig.max())
    assert np.allclose(projected ** 2, (vectors.T @ columns) ** 2, rtol=1e-8, atol=1e-12)
    assert np.allclose(np.abs(of([0, 17, 39])), np.abs(vectors[:, [0, 17, 39]]), atol=1e-8)
    import torch

    got, projected, of = gram.eigh_projected(square, columns, device=torch.device("cpu"))  # a GPU's way
    assert np.allclose(got, eig, rtol=1e-12, atol=1e-9 * eig.max())
    assert np.allclose(projected ** 2, (vectors.T @ columns) ** 2, rtol=1e-6, atol=1e-12)  # another solver: 2e-8
    assert np.allclose(np.abs(of([0, 39])), np.abs(vectors[:, [0, 39]]), atol=1e-8)


def test_a_float32_summed_grams_null_directions_are_dropped_as_a_float64_grams(monkeypatch, route):
    """Columns that are exact sums of others leave F'F exactly singular; summed in float32 its null eigenvalues
    come out near the rounding (1e-4, against the rank rule's 7e-9 cut-off), and LogME -- whose truncated
    evidence counts each kept eigenvalue -- moved by 5e-3 relative. Taken again from the rows they are dropped,
    as in float64."""
    import torch

    X, y = data(3000, 30, 4)
    X = (np.round(X * 1024) / 1024).astype(np.float32)  # 12 bits: the sums below are exact, the Gram's are not
    X = np.hstack([X, X[:, :1] + X[:, 1:2], X[:, 2:3] - X[:, 3:4]])  # a null space of dimension 2
    exact = {name: SCORERS[name].from_moments(gram.moments([torch.from_numpy(X)], y, 4))
             for name in ("logme", "hscore", "hscore_reg")}
    monkeypatch.setattr(gram, "EXACT_FLOPS", 0)  # products in float32, as for a large Gram
    summed = gram.moments([torch.from_numpy(X)], y, 4, chunk=3000)
    assert summed.rounding > 0
    for name, value in exact.items():
        assert SCORERS[name].from_moments(summed) == pytest.approx(value, rel=1e-6), name
    monkeypatch.setattr(gram, "NOISE", 0.0)  # without taking them again: the null directions are kept
    assert SCORERS["logme"].from_moments(gram.moments([torch.from_numpy(X)], y, 4, chunk=3000)) != \
        pytest.approx(exact["logme"], rel=1e-5)


def test_rank_deficient_features_and_larger_means_better():
    X, y = data()
    doubled = np.hstack([X, X])  # rank 10 in 20 columns
    assert np.isfinite(logme(doubled, y, 3)) and h_score(doubled, y, 3) == pytest.approx(h_score(X, y, 3), rel=1e-6)
    assert logme(doubled, y, 3) == pytest.approx(logme_by_definition(doubled, y, 3), rel=1e-6)
    noise, _ = data(signal=0.0)
    for name, entry in SCORERS.items():
        assert entry.larger_is_better
        if entry.parts:  # compared together: test_the_new_scores_rank_an_informative_tap_above_noise
            continue
        assert entry.score(X, y, 3) > entry.score(noise, y, 3), name  # features that hold the labels score higher


def test_nce_is_the_negative_conditional_entropy_of_the_labels_given_the_source_labels():
    """NCE (Tran et al. 2019) from counts by loops; LEEP of logits is LEEP of their softmax."""
    from featcache.sweeping.scorers import leep, nce, softmax

    rng = np.random.default_rng(0)
    logits, y = rng.normal(size=(200, 7)), rng.integers(0, 3, 200)
    z = logits.argmax(1)
    total = 0.0
    for a in range(3):
        for b in range(7):
            p_ab = np.mean((y == a) & (z == b))
            if p_ab > 0:
                total += p_ab * np.log(p_ab / np.mean(z == b))
    assert nce(logits, y, 3) == pytest.approx(total, rel=1e-12) and total < 0
    assert leep(logits, y, 3) == pytest.approx(leep_of(softmax(logits), y, 3), rel=1e-12)
    perfect = np.eye(3)[y] * 10  # source labels that are the target labels: no uncertainty left
    assert nce(perfect, y, 3) == pytest.approx(0.0, abs=1e-12)


# --- SFDA, NCTI, ETran against transcriptions of their authors' code ------------------------------------------------
# SFDA: TencentARC/SFDA metrics.py (``SFDA_Score``, ``SFDA._solve_eigen``, ``iterative_A``; the same code is in
# OpenGVLab/Multitask-Model-Selector); NCTI: BUserName/NCTI (``NCTI_Score`` and its min-max sum); ETran:
# mgholamikn/ETran at a63361e1cd0e090b9d0462bf6e3bdf4dc547b22d (metrics.py ``Energy_Score``, ``LDA_Score``; tw.py's
# 0.15 / 0.85 sum). Written out again here step by step: the D x D scatter matrices, scipy's generalised eigenvectors.


def _empirical(X, shrinkage=-1.0):
    cov = np.cov(X.T, bias=True)
    if shrinkage < 0:
        return cov
    d = cov.shape[0]
    out = (1 - shrinkage) * cov
    out.flat[::d + 1] += shrinkage * np.trace(cov) / d
    return out


def _softmax(z):
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _fisher_posteriors(X, y, shrinkage=None, generalised=True):
    """The authors' ``_solve_eigen`` then ``predict_proba``: Sw, its adaptive shrinkage, St, Sb = St - Sw_a, the
    eigenvectors V sorted by eigenvalue, coef = mu V V'."""
    from scipy import linalg

    classes = np.unique(y)
    priors = np.array([np.mean(y == c) for c in classes])
    means = np.stack([X[y == c].mean(0) for c in classes])
    within = sum(p * np.atleast_2d(_empirical(X[y == c])) for p, c in zip(priors, classes))
    if shrinkage is None:
        x = within.sum(axis=1)
        for _ in range(3):
            v = within @ x / np.linalg.norm(within @ x)
            x = within @ v / np.linalg.norm(within @ v)
        shrinkage = max(np.exp(-5 * (x @ within @ v)), 1e-10)
    d = within.shape[0]
    shrunk = (1 - shrinkage) * within
    shrunk.flat[::d + 1] += shrinkage * np.trace(within) / d
    between = _empirical(X, shrinkage) - shrunk
    values, vectors = linalg.eigh(between, shrunk) if generalised else np.linalg.eigh(np.linalg.inv(shrunk) @ between)
    vectors = vectors[:, np.argsort(values)[::-1]]
    coef = means @ vectors @ vectors.T
    return _softmax(X @ coef.T - 0.5 * np.diag(means @ coef.T) + np.log(priors)), means, shrinkage


def sfda_as_the_authors_compute_it(X, y):
    X = X.copy()
    proba, means, shrinkage = _fisher_posteriors(X, y)
    proba = np.exp(proba) / np.exp(proba).sum(axis=1, keepdims=True)
    k = len(means)
    for c in range(k):
        rows = np.where(y == c)[0]
        p = proba[rows, c][:, None]
        X[rows] = p * X[rows] + (1 - p) * (means.sum(0) - means[c]) / (k - 1)
    proba, _, _ = _fisher_posteriors(X, y, shrinkage)
    return proba[np.arange(len(y)), y].mean()


def ncti_terms_by_definition(X, y, classes):
    """PCA by NumPy's SVD, the shrinkage LDA's discriminant directions by scipy's generalised eigh (the SVD solver
    where the shrinkage floors at 1e-10: the whitened class means' directions), the three terms."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    centred = X - X.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(64, *X.shape)
    reduced = centred @ vt[:k].T
    variance = s[:k] ** 2 / (len(X) - 1)
    shrinkage = max(np.exp(-variance[:32].sum()), 1e-10)
    if shrinkage > 1e-10:
        proba, _, _ = _fisher_posteriors(reduced, y, shrinkage)
    else:
        proba = LinearDiscriminantAnalysis(solver="svd").fit(reduced, y).predict_proba(reduced)
    lda = LinearDiscriminantAnalysis(solver="svd" if shrinkage == 1e-10 else "eigen",
                                     shrinkage=None if shrinkage == 1e-10 else shrinkage).fit(reduced, y)
    projected = lda.transform(reduced)
    seli = np.linalg.svd(projected - projected.mean(0), compute_uv=False).sum()
    ncc = proba[np.arange(len(y)), y].mean()
    vc = np.log(sum(np.linalg.svd(proba[y == c], compute_uv=False).sum() for c in range(classes)))
    return np.array([seli, ncc, vc])


@pytest.mark.parametrize(("n", "d", "classes"), [(200, 16, 3), (90, 40, 5), (300, 8, 2), (150, 100, 4)])
def test_sfda_ncti_and_etran_equal_their_authors_code(n, d, classes):
    from featcache.sweeping.scorers import etran_parts, ncti_parts, sfda

    X, y = data(n, d, classes, signal=0.3)
    assert sfda(X, y, classes) == pytest.approx(sfda_as_the_authors_compute_it(X, y), rel=1e-9, abs=1e-12)
    assert ncti_parts(X, y, classes) == pytest.approx(ncti_terms_by_definition(X, y, classes), rel=1e-6)
    small = X * 0.02  # PCA variances summing under 23: the shrinkage LDA, not the SVD solver
    assert ncti_parts(small, y, classes) == pytest.approx(ncti_terms_by_definition(small, y, classes), rel=1e-6)
    # ETran's LDA term: the authors' eigh of the unsymmetric Sw^-1 Sb (orthonormal vectors, so V V' = I)
    proba, _, _ = _fisher_posteriors(X, y, generalised=False)
    values = np.log(np.exp(X).sum(axis=1))
    energy = np.sort(values)[:max(5 * n // 1000, 1)].mean()
    assert etran_parts(X, y, classes) == pytest.approx([energy, proba[np.arange(n), y].mean()], rel=1e-9)


def test_ncti_and_etran_combine_their_terms_over_the_candidates_as_the_authors_scripts():
    from featcache.sweeping.scorers import combined

    parts = [[10.0, 0.5, 2.0], [20.0, 0.7, 1.0], [15.0, 0.9, 3.0], None]
    # seli (0, 1, .5) + ncc (0, .5, 1) - vc (.5, 0, 1); the failed candidate has none
    assert combined("ncti", parts)[:3] == pytest.approx([-0.5, 1.5, 0.5]) and np.isnan(combined("ncti", parts)[3])
    assert combined("etran", [[1.0, 0.2], [3.0, 0.6]]) == pytest.approx([0.0, 1.0])
    assert combined("etran", [[1.0, 0.2]]) == pytest.approx([0.0])  # one candidate: nothing to scale against


def test_the_new_scores_rank_an_informative_tap_above_noise():
    from featcache.sweeping.scorers import combined

    informative, y = data(200, 12, 4, signal=1.0)
    noise, _ = data(200, 12, 4, signal=0.0, seed=1)
    assert SCORERS["sfda"].score(informative, y, 4) > SCORERS["sfda"].score(noise, y, 4)
    for name in ("ncti", "etran"):
        good, bad = combined(name, [list(SCORERS[name].score(X, y, 4)) for X in (informative, noise)])
        assert good > bad, name


def _centred_gram(gram, unbiased=False):
    """Kornblith et al.'s centring of a Gram matrix (their colab's ``center_gram``), written out again."""
    gram = gram.copy()
    n = len(gram)
    if unbiased:
        np.fill_diagonal(gram, 0)
        means = gram.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
    else:
        means = gram.mean(0)
        means -= means.mean() / 2
    gram -= means[:, None]
    gram -= means[None, :]
    if unbiased:
        np.fill_diagonal(gram, 0)
    return gram


def cka_by_grams(X, Y, unbiased=False):
    """CKA as the paper defines it: HSIC of the centred linear Gram matrices, normalised."""
    gx, gy = _centred_gram(X @ X.T, unbiased), _centred_gram(Y @ Y.T, unbiased)
    return gx.ravel() @ gy.ravel() / (np.linalg.norm(gx) * np.linalg.norm(gy))


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_equals_the_papers_gram_form_and_has_its_invariances(debiased):
    from featcache.sweeping.similarity import linear_cka

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 12))
    Y = X @ rng.normal(size=(12, 7)) + 0.5 * rng.normal(size=(60, 7))
    assert linear_cka(X, Y, debiased) == pytest.approx(cka_by_grams(X, Y, debiased), rel=1e-9)
    rotation, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert linear_cka(X, 3.0 * X @ rotation + 5.0, debiased) == pytest.approx(1.0)  # rotation, scale, shift
    assert abs(linear_cka(X, rng.normal(size=(60, 9)), debiased)) < (0.2 if debiased else 0.4)


def test_featcache_similarity_writes_every_pairs_cka_and_the_report_draws_it(tmp_path):
    from click.testing import CliRunner

    import featcache
    from featcache.cli.commands import cli
    from featcache.extraction.reader import FeatureCache
    from featcache.fuse.fusion import TapNormalizer
    from featcache.sweeping.similarity import linear_cka

    common = dict(backbone=["tiny", "tiny2"], weights="random", image_size=32, device="cpu", limit_train=90,
                  limit_test=30, cache_dir=tmp_path / "cache", runs_dir=tmp_path / "runs", quiet=True)
    matrix = featcache.similarity(**common, extract=True)
    assert matrix.shape == (6, 6) and np.allclose(matrix, matrix.T) and np.allclose(np.diag(matrix), 1)
    [a, b] = sorted((tmp_path / "cache" / "digits").glob("*.h5"))[:2]
    with FeatureCache(a) as first, FeatureCache(b) as second:
        blocks = [TapNormalizer("standard").fit_transform([c.read("train", "stage3").astype(np.float32)])
                  for c in (first, second)]
    names = {a.name.split("-")[0], b.name.split("-")[0]}
    assert names == {"tiny", "tiny2"}
    got = matrix.loc[f"{a.name.split('-')[0]}:stage3", f"{b.name.split('-')[0]}:stage3"]
    assert got == pytest.approx(linear_cka(*blocks), rel=1e-9)
    folder = matrix.attrs["folder"]
    pairs = __import__("pandas").read_csv(folder / "pairs.csv")
    assert len(pairs) == 15 and list(pairs["cka"]) == sorted(pairs["cka"])
    out = tmp_path / "r.html"
    done = CliRunner().invoke(cli, ["report", str(folder), "--runs-dir", str(tmp_path / "runs"), "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert "Which taps say the same thing: tiny + tiny2 on digits" in out.read_text()
