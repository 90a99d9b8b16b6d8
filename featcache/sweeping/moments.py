"""The moments the linear transferability scores are computed from, and their decompositions.

Inside the sweep (run -> scorers -> **moments**) and ``featcache rank``. One pass over a group's standardised
training rows gives every tap's Gram ``F'F`` (or, with fewer rows than columns, each tap's kernel ``FF'``), ``F'Y``
and the rows' norms; a combination of taps is a block of them (:class:`Moments`), decomposed once for all its
scores (:meth:`Moments.spectrum`, or a Cholesky solve for the H-scores of a large one), a few combinations ahead
on every core (:func:`decompose`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import numpy as np


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

    @cached_property
    def kernel(self) -> np.ndarray:  # summed once: the spectrum, the solves and the shrinkage read it
        return self.kernels.sum(axis=0) if len(self.kernels) > 1 else self.kernels[0]

    @property
    def device(self):
        """The rows' torch device where it is not the host (their decompositions are made there), else None."""
        return None if self.parts is None or self.parts[0].device.type == "cpu" else self.parts[0].device

    def select(self, which: list[int]) -> Moments:
        """The moments of taps ``which`` side by side (indices into ``blocks``)."""
        widths = [self.blocks[k].stop - self.blocks[k].start for k in which]
        starts = np.cumsum([0] + widths)
        blocks = [slice(int(a), int(b)) for a, b in zip(starts, starts[1:])]
        parts = None if self.parts is None else [self.parts[k] for k in which]
        if self.kernels is not None and (sum(widths) >= self.n or parts is None):
            return Moments(self.counts, self.row_sq[:, which], blocks, kernels=self.kernels[which], onehot=self.onehot,
                           parts=parts)
        if self.kernels is not None:  # narrower than N: its D x D Gram costs less to decompose than the N x N kernel
            if self.narrow is not None and all(k in self.narrow[1] for k in which):
                return self.narrow[0].select([self.narrow[1][k] for k in which])
            import torch

            labels = torch.as_tensor(self.onehot.argmax(axis=1), device=parts[0].device)
            return _gram_moments(parts, labels, self.counts, None)
        columns = np.concatenate([np.arange(self.blocks[k].start, self.blocks[k].stop) for k in which])
        return Moments(self.counts, self.row_sq[:, which], blocks, gram=self.gram[np.ix_(columns, columns)],
                       cross=self.cross[columns], parts=parts, rounding=self.rounding)

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
            eig, projected, vectors = eigh_projected(square, right, device=self.device)
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

    parts = [p if getattr(p, "streamed", False) else torch.as_tensor(p) for p in parts]  # rows read where sliced
    device = parts[0].device
    widths = [p.shape[1] for p in parts]
    total, n = sum(widths), parts[0].shape[0]
    labels = torch.as_tensor(np.asarray(y.cpu() if hasattr(y, "cpu") else y), dtype=torch.int64, device=device)
    host = labels.cpu().numpy()
    counts = np.bincount(host, minlength=n_classes).astype(np.float64)
    if n <= total and len(parts) * n * n <= total * total:  # fewer rows than columns: the rows' kernels
        edges = np.cumsum([0] + widths)
        blocks = [slice(int(a), int(b)) for a, b in zip(edges, edges[1:])]
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
        for k, (piece, columns) in enumerate(zip(pieces, blocks)):
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
             and block.device is None]  # a GPU's solver takes them in turn
    if workers < 2 or len(small) < 2:
        return

    def one(block) -> None:
        started = time.perf_counter()
        block.spectrum()
        block.spent = time.perf_counter() - started

    with threadpool_limits(1), ThreadPoolExecutor(min(workers, len(small))) as pool:
        list(pool.map(one, small))


class ScoreBlocks:
    """Each combination's block of one Gram (or kernels) of every tap the group's scores name, in the order the
    jobs come, decomposed ahead a few combinations at a time on every core (``moments.decompose``)."""

    def __init__(self, every, index: dict, order: list, workers: int):
        self.every, self.index, self.order, self.workers = every, index, order, workers
        self.position = {key: at for at, key in enumerate(order)}
        self.ready: dict = {}

    @classmethod
    def of(cls, combos: list, fit: dict, labels, n_classes: int):
        """The blocks of ``combos`` (tap tuples, in the order they will be taken) over the taps ``fit`` holds;
        None where there are none."""
        import torch

        if not combos:
            return None
        refs = list(dict.fromkeys(ref for combo in combos for ref in combo))
        order = list(dict.fromkeys(tuple(combo) for combo in combos))
        return cls(moments([fit[r] for r in refs], labels, n_classes), {ref: k for k, ref in enumerate(refs)},
                   order, torch.get_num_threads())

    def take(self, refs) -> object:
        key = tuple(refs)
        if key in self.ready:
            return self.ready.pop(key)
        if key not in self.position or not self._ahead(key):  # decomposed in turn with every thread
            return self.every.select([self.index[r] for r in key])
        at = self.position[key]  # this one and the next few small ones, decomposed together
        batch = {k: self.every.select([self.index[r] for r in k])
                 for k in self.order[at:at + 2 * self.workers] if k not in self.ready and self._ahead(k)}
        decompose(list(batch.values()), self.workers)
        self.ready.update(batch)
        return self.ready.pop(key)

    def _ahead(self, key) -> bool:
        """Whether a combination is decomposed ahead: several cores, rows on the host, and its matrix (its Gram,
        or the N x N kernel where it is as wide as the rows) under ``LARGE``: at most 2 x workers such blocks
        are held at once."""
        width = sum(self.every.blocks[self.index[r]].stop - self.every.blocks[self.index[r]].start for r in key)
        return self.workers > 1 and self.every.device is None and min(width, self.every.n) < LARGE
