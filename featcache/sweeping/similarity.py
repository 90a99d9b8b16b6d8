"""How much two taps say the same thing: linear centered kernel alignment (CKA), and its debiased form.

Inside the sweep's machinery (scorers, **similarity**), used by ``choose`` to say whether a fused pair's taps
are worth fusing. Kornblith, Norouzi, Lee and Hinton, "Similarity of neural network representations
revisited", ICML 2019: with column-centred features X (N, a) and Y (N, b),
``CKA = ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F)``: 1 for representations equal up to rotation and isotropic
scaling, near 0 for unrelated ones. The debiased form replaces each HSIC by its unbiased estimator (Song et al.,
JMLR 2012), as Nguyen, Raghu and Kornblith (ICLR 2021) use it for few rows. Both are computed in feature space
(a cross product of the two taps, O(N a b)), never from the N x N Gram matrices.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError


def _debiased(xty: float, rows_x: np.ndarray, rows_y: np.ndarray, norm_x: float, norm_y: float, n: int) -> float:
    """The unbiased HSIC (times a constant that cancels in CKA) from the plain one and the rows' squared norms."""
    return xty - n / (n - 2.0) * float(rows_x @ rows_y) + norm_x * norm_y / ((n - 1) * (n - 2))


class _Centred:
    """A tap's rows centred, with what every CKA of it needs once: ||X'X||_F and, for the debiased form, its
    rows' squared norms and their sum."""

    def __init__(self, X: np.ndarray, debiased: bool):
        X = np.asarray(X, dtype=np.float64)
        self.X = X - X.mean(axis=0, keepdims=True)
        self.n = len(X)
        self.rows = np.einsum("ij,ij->i", self.X, self.X) if debiased else None
        self.total = float(self.rows.sum()) if debiased else None
        gram = float(np.linalg.norm(self.X.T @ self.X))
        self.norm = np.sqrt(max(self._debiased(gram ** 2, self), 0.0)) if debiased else gram

    def _debiased(self, xty: float, other: _Centred) -> float:
        return _debiased(xty, self.rows, other.rows, self.total, other.total, self.n)

    def cka(self, other: _Centred) -> float:
        xty = float(np.linalg.norm(self.X.T @ other.X) ** 2)
        if self.rows is not None:
            xty = self._debiased(xty, other)
        denominator = self.norm * other.norm
        return float(xty / denominator) if denominator > 0 else float("nan")


def _centred(blocks: list, debiased: bool) -> list[_Centred]:
    if len({len(b) for b in blocks}) > 1:
        raise ValueError("CKA compares taps on the same rows")
    if debiased and len(blocks[0]) < 4:
        raise ValueError("debiased CKA needs at least 4 rows")
    return [_Centred(b, debiased) for b in blocks]


def linear_cka(X: np.ndarray, Y: np.ndarray, debiased: bool = False) -> float:
    """Linear CKA between two taps' rows (the same images, in the same order)."""
    x, y = _centred([X, Y], debiased)
    return x.cka(y)


def cka_matrix(blocks: list, debiased: bool = False) -> np.ndarray:
    """Linear CKA of every pair of ``blocks`` (taps on the same rows), each tap centred and its own norm taken
    once: a pair costs one cross product. 1 on the diagonal."""
    taps = _centred(blocks, debiased)
    matrix = np.eye(len(taps))
    for i, a in enumerate(taps):
        for j in range(i + 1, len(taps)):
            matrix[i, j] = matrix[j, i] = a.cka(taps[j])
    return matrix


def similarity(request, log=print):
    """``featcache similarity``: linear CKA between every pair of the cached taps of the request's backbones
    (within and across them), on every training image, each tap standardised as the probes see it. Writes
    ``RUNS/similarity/NAME/cka.csv`` (the matrix, taps in network order) and ``pairs.csv`` (one row a pair,
    least similar first); returns the matrix as a DataFrame (``.attrs['folder']``)."""
    import pandas as pd

    from featcache.data.datasets import dataset_identity, dataset_key
    from featcache.extraction.reader import FeatureCache
    from featcache.extraction.run import extract
    from featcache.files import atomic_write
    from featcache.fuse.caches import locate_caches
    from featcache.fuse.fusion import TapNormalizer, parse_taps
    from featcache.requests import request_hash
    from featcache.sweeping.config import all_taps

    features = request.features(request.device, skip_bad_images=request.skip_bad_images)
    refs = all_taps(features) if not request.taps else \
        list(dict.fromkeys(r for text in request.taps for r in parse_taps(text, features)))
    if len(refs) < 2:
        raise FeatcacheError("featcache similarity compares taps: name at least two (or a backbone with two taps)")
    if request.extract:
        extract(features, log=log)
    paths = locate_caches(features)
    blocks = {}
    for ref in refs:
        with FeatureCache(paths[ref.backbone]) as cache:
            blocks[ref] = TapNormalizer("standard").fit_transform([cache.read("train", ref.tap).astype(np.float32)])
    names = [str(r) for r in refs]
    matrix = cka_matrix([blocks[r] for r in refs], request.debiased)
    pairs = [{"tap_a": names[i], "tap_b": names[j], "cka": float(matrix[i, j])}
             for i in range(len(refs)) for j in range(i + 1, len(refs))]
    data = request.data_request()
    digest = request_hash({"taps": names, "debiased": request.debiased, "caches": sorted(p.name for p in
                                                                                          paths.values()),
                           "data": dataset_identity(data)}, 10)
    folder = Path(request.runs_dir) / "similarity" / f"{dataset_key(data)}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(matrix, index=names, columns=names)
    ordered = pd.DataFrame(pairs).sort_values("cka", kind="stable").reset_index(drop=True)
    atomic_write(folder / "cka.csv", table.to_csv())
    atomic_write(folder / "pairs.csv", ordered.to_csv(index=False))
    atomic_write(folder / "similarity.json", json.dumps(  # what the report titles it by (plain JSON)
        {"backbones": list(features.backbones), "dataset": request.dataset_label(), "weights": str(features.weights),
         "debiased": request.debiased, "images": int(len(next(iter(blocks.values()))))}))
    kind = "debiased linear CKA" if request.debiased else "linear CKA"
    log(f"{kind} of {len(refs)} taps on {len(next(iter(blocks.values())))} training images; the least similar pairs "
        f"(the most to gain from fusing, if each is good alone):")
    for row in ordered.head(5).itertuples():
        log(f"  {row.cka:6.3f}  {row.tap_a} + {row.tap_b}")
    log(f"written to {folder} (cka.csv: the matrix, pairs.csv: every pair)")
    table.attrs["folder"] = folder
    return table
