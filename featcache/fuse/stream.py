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
from featcache.fuse.fusion import TapNormalizer, column_moments

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
    """A TapNormalizer fitted in one streaming pass: float64 sums of the rows and their squares, each row added in
    turn, so bit for bit what the normaliser fitted on the rows in memory gives."""
    sums = None
    for blocks, _ in data.blocks():
        sums = [column_moments(b, start=None if sums is None else sums[i]) for i, b in enumerate(blocks)]
    if sums is None:
        sums = [(np.zeros(d), np.zeros(d)) for d in (data.caches[r.backbone].taps(data.split)[r.tap][1]
                                                     for r in data.refs)]
    return TapNormalizer(method).fit_moments(len(data), [s for s, _ in sums], [q for _, q in sums])


class TapRows:
    """One tap's normalised rows of a :class:`FusedRows`, read from the cache where a slice of positions asks for
    them: what the scores' moments (:func:`featcache.sweeping.moments.moments`) accumulate chunk by chunk, as they do
    over a tensor of the rows in memory, and the same numbers (each chunk read, then normalised as in memory)."""

    streamed = True  # what the moments tell it from a tensor by

    def __init__(self, data: FusedRows):
        [self.ref] = data.refs
        self.data = data
        self.shape = data.shape
        import torch

        self.device, self.dtype = torch.device("cpu"), torch.float32

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice):
        import torch

        start, stop, step = index.indices(len(self))
        if step != 1:
            raise IndexError("TapRows takes a contiguous slice of positions")
        rows = self.data.rows[start:stop]
        if not len(rows):
            return torch.zeros((0, self.shape[1]), dtype=torch.float32)
        cache = self.data.caches[self.ref.backbone]
        raw = float32(cache.read(self.data.split, self.ref.tap, rows=slice(int(rows[0]), int(rows[-1]) + 1)))
        return torch.from_numpy(self.data.normalizer.transform([raw[rows - rows[0]]]))
