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

from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError


def _debiased(xty: float, rows_x: np.ndarray, rows_y: np.ndarray, norm_x: float, norm_y: float, n: int) -> float:
    """The unbiased HSIC (times a constant that cancels in CKA) from the plain one and the rows' squared norms."""
    return xty - n / (n - 2.0) * float(rows_x @ rows_y) + norm_x * norm_y / ((n - 1) * (n - 2))


def linear_cka(X: np.ndarray, Y: np.ndarray, debiased: bool = False) -> float:
    """Linear CKA between two taps' rows (the same images, in the same order)."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if len(X) != len(Y):
        raise ValueError("CKA compares two taps on the same rows")
    X = X - X.mean(axis=0, keepdims=True)
    Y = Y - Y.mean(axis=0, keepdims=True)
    xty = float(np.linalg.norm(X.T @ Y) ** 2)
    xtx, yty = float(np.linalg.norm(X.T @ X)), float(np.linalg.norm(Y.T @ Y))
    if debiased:
        n = len(X)
        if n < 4:
            raise ValueError("debiased CKA needs at least 4 rows")
        rows_x, rows_y = np.einsum("ij,ij->i", X, X), np.einsum("ij,ij->i", Y, Y)
        sx, sy = float(rows_x.sum()), float(rows_y.sum())
        xty = _debiased(xty, rows_x, rows_y, sx, sy, n)
        xtx = np.sqrt(max(_debiased(xtx ** 2, rows_x, rows_x, sx, sx, n), 0.0))
        yty = np.sqrt(max(_debiased(yty ** 2, rows_y, rows_y, sy, sy, n), 0.0))
    denominator = xtx * yty
    return float(xty / denominator) if denominator > 0 else float("nan")


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
    refs = all_taps(features.backbones) if not request.taps else \
        list(dict.fromkeys(r for text in request.taps for r in parse_taps(text, features.backbones)))
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
    matrix = np.eye(len(refs))
    pairs = []
    for i, a in enumerate(refs):
        for j in range(i + 1, len(refs)):
            value = linear_cka(blocks[a], blocks[refs[j]], request.debiased)
            matrix[i, j] = matrix[j, i] = value
            pairs.append({"tap_a": names[i], "tap_b": names[j], "cka": value})
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
    import json

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
