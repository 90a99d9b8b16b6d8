"""Extraction across processes started by ``torchrun``: one contiguous shard per rank, one cache.

Flow: extract -> **distributed** -> store. ``torchrun --nproc-per-node N -m featcache
extract ...`` (and across nodes with ``--nnodes``) starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set. Each rank runs the backbone on whole batches
``[first, last)`` of every split, the batches a single process would run, and writes
them to its own resumable shard file beside the cache. Rank 0 then copies the shards,
in order and in the same batches, into the cache file a single process writes, so the
result is the same file. The cache folder must be visible to every rank (one machine,
or shared storage across nodes). Who is which rank, and how they agree:
:mod:`featcache.torchrun`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError
from featcache.torchrun import Ranks


def shard_rows(n_rows: int, batch_size: int, r: Ranks) -> tuple[int, int]:
    """Rows ``[start, stop)`` of this rank: a contiguous run of whole batches."""
    batches = -(-n_rows // batch_size)
    first, last = batches * r.rank // r.world, batches * (r.rank + 1) // r.world
    return min(first * batch_size, n_rows), min(last * batch_size, n_rows)


def shard_file(path: Path, r: Ranks) -> Path:
    return Path(path).with_name(f"{Path(path).name}.rank{r.rank}of{r.world}")


def merge(writer, shards: list[tuple[Path, dict[str, tuple[int, int]]]], batch_size: int) -> None:
    """Copy finished shard files into the cache writer, batch by batch, in row order."""
    import h5py

    for path, rows in shards:
        with h5py.File(path, "r") as shard:
            for split, (start, stop) in rows.items():
                group = shard[split]
                for offset in range(0, stop - start, batch_size):
                    chunk = slice(offset, min(offset + batch_size, stop - start))
                    features = {tap: _rescaled(writer, split, tap, group["taps"][tap], chunk) for tap in group["taps"]}
                    writer.write(split, start + offset, features, skipped=group["skipped"][chunk])


def _rescaled(writer, split: str, tap: str, dataset, chunk):
    """A shard's stored rows as the cache stores them: each rank chose its taps' storage scales on its own first
    batch, the cache keeps the first rank's (powers of two: the rescaling is exact)."""
    from featcache.extraction.store import stored_scale

    raw = dataset[chunk]
    own = stored_scale(dataset)
    values = raw.astype(np.float32) / own if own != 1.0 else raw
    scale = writer.scale_for(split, tap, float(np.abs(values).max()) if len(values) else 0.0)
    if scale == own:
        return raw
    stored = (values * scale).astype(raw.dtype)
    if not np.isfinite(stored).all():  # this rank's values outgrow the first rank's scale
        raise FeatcacheError(f"features of {tap} overflow {raw.dtype}: use --dtype float32")
    return stored


def remove_shards(paths: list[Path]) -> None:
    for path in paths:
        for candidate in (path, path.with_name(path.name + ".partial"), path.with_name(path.name + ".lock")):
            candidate.unlink(missing_ok=True)

