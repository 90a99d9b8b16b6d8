"""Transferability scores: how well features should transfer, from features and labels alone, training nothing.

Inside the sweep (run -> **scorers**), beside the probes, and used by ``featcache rank``. ``SCORERS`` is the
registry ``--score`` offers. An entry scores one combination's standardised training features; the linear
scores (LogME, H-score, its regularised form) are computed from the combination's :class:`Moments` -- its Gram
matrix ``F'F``, ``F'Y`` and per-row norms -- which the sweep takes as blocks of one Gram of every tap, so no
combination passes over the rows again. The sweep writes them as rows of kind ``score`` (``scores.csv``).
"""

from __future__ import annotations

import itertools
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
        source: the score reads a source classifier's output: ``X`` is then the ``logits`` tap as stored (not
            standardised), one per backbone (extracted with ``--logits``).
    """

    score: Callable[[np.ndarray, np.ndarray, int], float]
    help: str
    larger_is_better: bool = True
    from_moments: Callable | None = None
    source: bool = False

    def __post_init__(self):
        if not callable(self.score):
            raise ValueError("a scorer's score must be callable")


SCORERS = Registry("--score")


@dataclass
class Moments:
    """What the linear scores need of features ``F`` (N, D) and one-hot labels ``Y`` (N, C), for a combination of
    taps without passing over the rows again.

    With more rows than columns: ``gram`` = F'F (D, D) and ``cross`` = F'Y (D, C); a combination is a block of
    them. With fewer rows than columns (and the N x N kernels smaller than the Gram): ``kernels`` (T, N, N),
    each tap's F_t F_t', and ``onehot`` Y; a combination's kernel is their sum -- or, where the combination is
    narrower than N, its own (smaller) Gram: a block of ``narrow`` (the Gram-side moments of the taps narrower
    than N, and each one's index there) or, where that would outgrow the kernels, from ``parts``, the taps'
    rows. Either way ``counts`` (C,), ``row_sq`` (N, T): each row's squared norm within each tap, and
    ``blocks``: each tap's columns. ``parts`` are the taps' rows (references): a Gram summed in float32 (its
    ``rounding`` above 0, see ``NOISE``) takes its near-null eigenvalues again from them.
    """

    counts: np.ndarray
    row_sq: np.ndarray
    blocks: list
    gram: np.ndarray | None = None
    cross: np.ndarray | None = None
    kernels: np.ndarray | None = None
    onehot: np.ndarray | None = None
    parts: list | None = None
    rounding: float = 0.0
    narrow: tuple | None = None

    @property
    def n(self) -> int:
        return len(self.row_sq)

    @property
    def d(self) -> int:
        return sum(b.stop - b.start for b in self.blocks)

    @property
    def kernel(self) -> np.ndarray:
        return self.kernels.sum(axis=0) if len(self.kernels) > 1 else self.kernels[0]

    def select(self, which: list[int]) -> Moments:
        """The moments of taps ``which`` side by side (indices into ``blocks``)."""
        widths = [self.blocks[k].stop - self.blocks[k].start for k in which]
        starts = np.cumsum([0] + widths)
        blocks = [slice(int(a), int(b)) for a, b in zip(starts, starts[1:])]
        if self.kernels is not None and (sum(widths) >= self.n or self.parts is None):
            return Moments(self.counts, self.row_sq[:, which], blocks, kernels=self.kernels[which], onehot=self.onehot,
                           parts=None if self.parts is None else [self.parts[k] for k in which])
        if self.kernels is not None:  # narrower than N: its D x D Gram costs less to decompose than the N x N kernel
            if self.narrow is not None and all(k in self.narrow[1] for k in which):
                return self.narrow[0].select([self.narrow[1][k] for k in which])
            gram, cross = _gram([self.parts[k] for k in which], self.onehot)
            return Moments(self.counts, self.row_sq[:, which], blocks, gram=gram, cross=cross)
        columns = np.concatenate([np.arange(self.blocks[k].start, self.blocks[k].stop) for k in which])
        return Moments(self.counts, self.row_sq[:, which], blocks, gram=self.gram[np.ix_(columns, columns)],
                       cross=self.cross[columns], parts=None if self.parts is None else [self.parts[k] for k in which],
                       rounding=self.rounding)

    def live(self):
        """(the combination's Gram or kernel, F'Y or Y, the Gram's columns kept): the Gram without its all-zero
        columns (dead features, whose every value is 0: they add nothing to any score -- their eigenvalues are the
        zeros the rank rule drops -- and leave the Gram singular)."""
        if self.kernels is not None:
            return self.kernel, self.onehot, None
        if getattr(self, "_live", None) is None:  # taken once: the spectrum and the solves read the same
            live = np.flatnonzero(np.diag(self.gram) > 0)
            self._live = ((self.gram, self.cross, live) if len(live) == len(self.gram)
                          else (self.gram[np.ix_(live, live)], self.cross[live], live))
        return self._live

    def spectrum(self):
        """(eigenvalues, projections): of F'F with (V'F'Y)^2 / s^2 per class, or of FF' with (U'Y)^2 -- the
        squared coordinates of each class's one-hot column in the features' left singular basis. Decomposed
        once: every score of the combination reads the same."""
        if getattr(self, "_spectrum", None) is None:
            square, right, live = self.live()
            device = None if self.parts is None or self.parts[0].device.type == "cpu" else self.parts[0].device
            eig, projected, vectors = eigh_projected(square, right, device=device)
            if self.rounding and self.parts is not None:  # a float32-summed Gram: its null directions are not 0
                suspect = np.flatnonzero(eig < NOISE * self.rounding)
                if len(suspect):
                    eig[suspect] = self._exactly(vectors(suspect), live)
            if self.kernels is not None:
                self._spectrum = np.clip(eig, 0, None), projected ** 2
            else:
                eig = np.clip(eig, 0, None)
                with np.errstate(divide="ignore", invalid="ignore"):
                    x2 = np.where(eig[:, None] > 0, projected ** 2 / eig[:, None], 0.0)
                self._spectrum = eig, x2
        return self._spectrum

    def _exactly(self, vectors: np.ndarray, live) -> np.ndarray:
        """``|F v|^2`` of each column ``v`` of ``vectors`` (over the Gram's ``live`` columns) from the rows, in
        float64: the exact eigenvalues of directions a float32-summed Gram leaves in its rounding."""
        import torch

        full = np.zeros((self.gram.shape[0], vectors.shape[1]))
        full[live] = vectors
        device = self.parts[0].device
        full = torch.as_tensor(full, device=device)
        total = torch.zeros(vectors.shape[1], dtype=torch.float64, device=device)
        for start in range(0, self.n, 512):  # rows converted to float64 a cache-sized slice at a time
            image = sum(p[start:start + 512].to(torch.float64) @ full[b] for p, b in zip(self.parts, self.blocks))
            total += image.square().sum(dim=0)
        return total.cpu().numpy()

    def solved(self, scale: float = 1.0, shift: float = 0.0) -> float | None:
        """``sum_c y_c' F (scale F'F + shift I)^+ F' y_c / n_c`` over the classes present, by a Cholesky solve
        (D x D, or N x N through ``F (s F'F + l I)^-1 F' = K (s K + l I)^-1``); None where the matrix is not
        comfortably positive definite (reciprocal condition under ``RCOND``), where only the spectrum's rank
        rule gives the pseudo-inverse's answer, and below ``LARGE``, where the spectrum costs about what the solve
        does."""
        from scipy.linalg import lapack

        present = self.counts > 0
        square, right, _ = self.live()
        if len(square) < LARGE:
            return None
        right = right[:, present] / np.sqrt(self.counts[present])
        matrix = square if (scale, shift) == (1.0, 0.0) else scale * square
        if shift:
            matrix[np.diag_indices_from(matrix)] += shift
        if not np.isfinite(matrix.trace()):  # a NaN or inf anywhere reaches the factor's diagonal
            return None
        factor, info = lapack.dpotrf(matrix, lower=1, clean=0)
        if info != 0:
            return None
        norm = np.abs(matrix).sum(axis=0).max()
        rcond, info = lapack.dpocon(factor, norm, uplo="L")
        # a float32-summed Gram's null directions carry eigenvalues up to about its rounding: unless the shift
        # dwarfs them, the smallest eigenvalue (at least rcond |M|_1 / sqrt(D), up to the estimate) must clear it
        floor = 10 * NOISE * self.rounding * scale if self.rounding and shift < NOISE * self.rounding * scale else 0
        if info != 0 or rcond < RCOND or rcond * norm / np.sqrt(len(matrix)) < floor:
            return None
        solution, info = lapack.dpotrs(factor, right, lower=1)
        left = right if self.kernels is None else square @ right
        return float((left * solution).sum())


# From this size on, a symmetric matrix's decomposition is worth avoiding or trimming: the H-scores try a Cholesky
# solve first (1,584 x 1,584: 0.05 s against 0.3-0.5 s for the spectrum), and the spectrum is taken by LAPACK's
# steps -- tridiagonal form, its eigenvectors by MRRR, the reflections applied to the few columns asked for --
# instead of forming every eigenvector (1,792 x 1,792: 0.50 s against 0.72 on two Zen 2 cores). Below it numpy's
# eigh is as fast, and a failed solve (a singular matrix) would only add to it.
LARGE = 1024
# A solve whose matrix's reciprocal condition number is under this leaves the answer to the spectrum (whose rank
# rule drops the near-null directions the pseudo-inverse drops); above it the Cholesky solve is accurate to about
# 1e-16 / RCOND relative and every eigenvalue is far above the rank rule's cut-off.
RCOND = 1e-8
# A Gram whose products are summed in float32 (``moments``' large ones) is off by about its ``rounding`` (float32's
# epsilon x sqrt(rows summed in one product) x its largest diagonal entry) in each entry, so a direction the rows
# leave exactly null gets an eigenvalue up to about that instead of 0 (1,792 columns, 45,000 rows: 5e-4, above the
# rank rule's 1e-4): eigenvalues under NOISE x rounding are taken again from the rows in float64 (``_exactly``).
NOISE = 1.0


def eigh_projected(square: np.ndarray, columns: np.ndarray, tridiagonal_from: int | None = None, device=None):
    """(eigenvalues ascending, ``V' columns``, ``vectors(which)`` -> ``V[:, which]``) of a symmetric matrix, ``V``
    its eigenvectors; on the host by LAPACK, or with a torch ``device`` there (float64 ``torch.linalg.eigh``: a
    GPU's solver, where the rows are on a GPU)."""
    from scipy.linalg import eigh_tridiagonal, lapack

    if device is not None:
        import torch

        eig, vectors = torch.linalg.eigh(torch.as_tensor(square, dtype=torch.float64, device=device))
        projected = vectors.T @ torch.as_tensor(columns, dtype=torch.float64, device=device)
        return eig.cpu().numpy(), projected.cpu().numpy(), lambda which: vectors[:, which].cpu().numpy()
    size = len(square)
    if size < (LARGE if tridiagonal_from is None else tridiagonal_from) or size < 3:
        eig, vectors = np.linalg.eigh(square)
        return eig, vectors.T @ columns, lambda which: vectors[:, which]
    lwork = int(lapack.dsytrd_lwork(size, lower=1)[0])
    packed, diagonal, off, tau, info = lapack.dsytrd(square, lower=1, lwork=lwork)
    if info != 0:
        raise np.linalg.LinAlgError(f"dsytrd failed (info {info})")
    eig, vectors = eigh_tridiagonal(diagonal, off, check_finite=False)
    # Q = H(1) ... H(n-1), the reflectors stored below the subdiagonal as a QR factor of packed[1:, :-1] (LAPACK's
    # dormtr for a lower triangle is dormqr on that block, rows 1.. on): V = Q W, so V' columns = W' (Q' columns)
    reflectors = packed[1:, :-1]

    def reflected(matrix: np.ndarray, trans: str) -> np.ndarray:
        rows = np.array(matrix[1:], dtype=np.float64, order="F")
        query = lapack.dormqr("L", trans, reflectors, tau, rows, -1)[1]
        rows, _, info = lapack.dormqr("L", trans, reflectors, tau, rows, int(query[0]), overwrite_c=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"dormqr failed (info {info})")
        return np.vstack([np.asarray(matrix[:1], np.float64), rows])

    return eig, vectors.T @ reflected(columns, "T"), lambda which: reflected(vectors[:, which], "N")


# A Gram is multiplied in float64 unless it is large (more flops than this) and tall (rows at least ten times its
# columns: a well-conditioned covariance); then in float32, summed in float64. Near N = D the H-score moved by 3e-4
# relative with float32 products (1,800 x 1,792), while a float64 Gram of that size took 0.27 s.
EXACT_FLOPS = 1e11


def moments(parts: list, y, n_classes: int, chunk: int | None = None) -> Moments:
    """The moments of taps ``parts`` (each (N, D_t), NumPy or torch, standardised) side by side, accumulated in
    float64 over row chunks on the parts' device (memory D x D, or T x N x N, never N x D in float64). A large
    Gram's products are float32, summed in float32 within a chunk and in float64 across chunks; the eigenvalues
    it leaves within its rounding are taken again from the rows in float64, so that a direction the rows leave
    null is dropped as a float64 Gram's would be (without that, one such direction on 45,000 x 1,792 moved LogME
    by 4e-4 relative, depending on the chunk size). LogME and the regularised H-score then agree with the float64
    Gram's to about 1e-6, the H-score to 3e-6 relative (benchmarks/RESULTS.md)."""
    import torch

    parts = [torch.as_tensor(p) for p in parts]
    device = parts[0].device
    widths = [p.shape[1] for p in parts]
    total, n = sum(widths), parts[0].shape[0]
    labels = torch.as_tensor(np.asarray(y.cpu() if hasattr(y, "cpu") else y), dtype=torch.int64, device=device)
    host = labels.cpu().numpy()
    counts = np.bincount(host, minlength=n_classes).astype(np.float64)
    edges = np.cumsum([0] + widths)
    blocks = [slice(int(a), int(b)) for a, b in zip(edges, edges[1:])]
    if n <= total and len(parts) * n * n <= total * total:  # fewer rows than columns: the rows' kernels
        row_sq = torch.stack([p.to(torch.float64).pow(2).sum(dim=1) for p in parts], dim=1).cpu().numpy()
        kernels = torch.stack([(lambda q: q @ q.T)(p.to(torch.float64)) for p in parts]).cpu().numpy()
        # and one Gram of the taps narrower than N, where it is no larger than the kernels: a combination of
        # them narrower than N is a block of it, whose decomposition costs less than the N x N kernel's
        narrow = [k for k, w in enumerate(widths) if w < n]
        inner = (_gram_moments([parts[k] for k in narrow], labels, counts, chunk)
                 if narrow and sum(widths[k] for k in narrow) ** 2 <= len(parts) * n * n else None)
        return Moments(counts, row_sq, blocks, kernels=kernels, onehot=np.eye(n_classes)[host], parts=parts,
                       narrow=None if inner is None else (inner, {k: i for i, k in enumerate(narrow)}))
    return _gram_moments(parts, labels, counts, chunk)


def _gram_moments(parts: list, labels, counts: np.ndarray, chunk: int | None) -> Moments:
    """The Gram-side moments of taps ``parts`` (torch, on one device) with ``labels`` there."""
    import torch

    device, n, n_classes = parts[0].device, parts[0].shape[0], len(counts)
    edges = np.cumsum([0] + [p.shape[1] for p in parts])
    blocks = [slice(int(a), int(b)) for a, b in zip(edges, edges[1:])]
    total = int(edges[-1])
    product = torch.float32 if n * total * total > EXACT_FLOPS and n >= 10 * total else torch.float64
    on_host = device.type == "cpu"  # numpy's matmul sees A' A and calls BLAS's syrk: half the products of F'F
    gram = np.zeros((total, total)) if on_host else torch.zeros((total, total), dtype=torch.float64, device=device)
    cross = torch.zeros((n_classes, total), dtype=torch.float64, device=device)
    row_sq = torch.zeros((n, len(parts)), dtype=torch.float64, device=device)
    chunk = chunk or int(np.clip(2 ** 27 // (total * (4 if product == torch.float32 else 8)), 1024, 32768))
    for start in range(0, n, chunk):  # tap by tap, no copy of the rows side by side: each block of the triangle
        pieces = [p[start:start + chunk].to(product) for p in parts]
        rows = [piece.numpy() for piece in pieces] if on_host else pieces
        for i, a in enumerate(rows):
            for j in range(i, len(rows)):
                product_ij = a.T @ rows[j]
                gram[blocks[i], blocks[j]] += product_ij if on_host else product_ij.to(torch.float64)
        for piece, columns, k in zip(pieces, blocks, range(len(parts))):
            sums = torch.zeros((n_classes, piece.shape[1]), dtype=product, device=device)  # each class's rows summed
            cross[:, columns] += sums.index_add_(0, labels[start:start + chunk], piece).to(torch.float64)
            row_sq[start:start + chunk, k] = torch.linalg.vector_norm(piece, dim=1).to(torch.float64) ** 2
    gram = gram if on_host else gram.cpu().numpy()
    for i, j in itertools.combinations(range(len(blocks)), 2):
        gram[blocks[j], blocks[i]] = gram[blocks[i], blocks[j]].T
    rounding = (float(np.finfo(np.float32).eps * np.sqrt(min(chunk, n)) * np.diag(gram).max())
                if product == torch.float32 else 0.0)
    return Moments(counts, row_sq.cpu().numpy(), blocks, gram=gram, cross=cross.T.cpu().numpy(), parts=parts,
                   rounding=rounding)


def _gram(parts: list, onehot: np.ndarray):
    """(F'F, F'Y) in float64 of taps ``parts`` side by side: a combination narrower than its rows."""
    import torch

    features = torch.cat([p.to(torch.float64) for p in parts], dim=1)
    onehot = torch.as_tensor(onehot, dtype=torch.float64, device=features.device)
    return (features.T @ features).cpu().numpy(), (features.T @ onehot).cpu().numpy()


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
    return {"score": float(value), "fit_s": time.perf_counter() - started + spent}


def decompose(blocks: list, workers: int) -> None:
    """The spectra of combinations' moments ``blocks`` made ahead, ``workers`` at a time, each with one BLAS thread
    (two single-threaded decompositions of 900 x 900 in parallel run 1.45x the throughput of one on two cores;
    LAPACK's tridiagonal reduction scales poorly over threads). Those from ``LARGE`` on are left to be made in
    turn with every thread, as are all where ``workers`` is 1. Each keeps the seconds its decomposition took
    (``spent``), which ``scored`` counts in the combination's first score."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    small = [block for block in blocks if (block.n if block.kernels is not None else len(block.gram)) < LARGE
             and (block.parts is None or block.parts[0].device.type == "cpu")]  # a GPU's solver takes them in turn
    if workers < 2 or len(small) < 2:
        return

    def one(block) -> None:
        started = time.perf_counter()
        block.spectrum()
        block.spent = time.perf_counter() - started

    with threadpool_limits(1), ThreadPoolExecutor(min(workers, len(small))) as pool:
        list(pool.map(one, small))


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


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


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
                                      "--logits), at most 0, larger is better", source=True))
SCORERS.register("nce")(Scorer(nce, "NCE (Tran et al. 2019), -H(target | source label), of the source classifier's hard "
                                    "labels (needs --logits), at most 0, larger is better", source=True))
