"""Fused rows streamed from the caches chunk by chunk, for features larger than memory.

Flow: store -> **stream** -> heads (``fuse-train --out-of-core``). A :class:`FusedRows`
stands for the fused, normalised matrix of some rows of one split without holding it:
it reads a contiguous range of rows of every tap at a time (at most about
``CHUNK_BYTES`` of float32), keeps the wanted rows and normalises them, so memory
stays at a few chunks whatever the number of rows. The torch heads
train on it directly; the normaliser is fitted on it in one pass.
"""

from __future__ import annotations

import numpy as np

from featcache.extraction.reader import float32
from featcache.fuse.fusion import TapNormalizer

CHUNK_BYTES = 8 << 20  # a chunk's float32 rows; with its temporaries a few times this is held at once


class FusedRows:
    """Rows ``rows`` (sorted positions among a split's served rows) of the fused taps ``refs``.

    Args:
        caches: backbone -> open :class:`~featcache.extraction.store.FeatureCache`.
        refs: the taps to concatenate, in order.
        split: ``train`` or ``test``.
        rows: which served rows this stands for (e.g. the fit or validation rows).
        normalizer: a fitted :class:`~featcache.fuse.fusion.TapNormalizer`, or None for raw blocks.
        chunk_rows: rows read at a time; by default what fits in ``CHUNK_BYTES``.
    """

    def __init__(self, caches, refs, split: str, rows: np.ndarray, normalizer=None, chunk_rows: int | None = None):
        self.caches, self.refs, self.split = caches, list(refs), split
        self.rows = np.asarray(rows, dtype=np.int64)
        self.normalizer = normalizer
        dims = [caches[r.backbone].taps(split)[r.tap][1] for r in self.refs]
        self.n_features = sum(dims)
        self.chunk_rows = chunk_rows or max(64, CHUNK_BYTES // (4 * self.n_features))
        self.total_rows = caches[self.refs[0].backbone].n_rows(split)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.n_features

    def with_normalizer(self, normalizer) -> FusedRows:
        return FusedRows(self.caches, self.refs, self.split, self.rows, normalizer, self.chunk_rows)

    def blocks(self, generator=None):
        """Yield (list of per-tap float32 blocks, positions in ``rows``) chunk by chunk.

        With a torch ``generator`` the chunks come in a random order (for training).
        """
        spans = list(range(0, self.total_rows, self.chunk_rows))
        if generator is not None:
            import torch

            spans = [spans[i] for i in torch.randperm(len(spans), generator=generator).tolist()]
        for start in spans:
            stop = min(start + self.chunk_rows, self.total_rows)
            lo, hi = np.searchsorted(self.rows, [start, stop])
            if lo == hi:
                continue
            wanted = self.rows[lo:hi] - start
            blocks = [float32(self.caches[r.backbone].read(self.split, r.tap, rows=slice(start, stop))[wanted])
                      for r in self.refs]
            yield blocks, np.arange(lo, hi)

    def chunks(self, generator=None):
        """Yield (normalised fused rows (n, D) float32, their positions in ``rows``)."""
        for blocks, positions in self.blocks(generator):
            yield self.normalizer.transform(blocks), positions


def fit_normalizer(method: str, data: FusedRows) -> TapNormalizer:
    """A TapNormalizer fitted in one streaming pass (float64 sums: mean and standard deviation)."""
    sums = squares = None
    for blocks, _ in data.blocks():
        if sums is None:
            sums = [np.zeros(b.shape[1]) for b in blocks]
            squares = [np.zeros(b.shape[1]) for b in blocks]
        for i, b in enumerate(blocks):
            sums[i] += b.sum(axis=0, dtype=np.float64)
            squares[i] += np.square(b, dtype=np.float64).sum(axis=0)
    return TapNormalizer(method).fit_moments(len(data), sums, squares)
