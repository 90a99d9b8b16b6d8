"""The HDF5 feature store: layout, fingerprint, locked resumable writes (extraction.reader reads it).

Between extraction and fusion in the flow (extract -> **store** -> fusion). One file per
(dataset, backbone, weights, preprocessing)::

    cache/<dataset>/<backbone>-<fingerprint hash[:12]>.h5
      attrs        fingerprint (canonical JSON), featcache_version, format, classes, complete
      /<split>/labels       int64 (N,)
      /<split>/index        int64 (N,)  position in the source dataset
      /train/official_val   uint8 (N,)  1: the row is the dataset's own validation split (only where it has one)
      /<split>/taps/<tap>   float16 (N, C) by default, chunked by rows; attrs ``scale`` (a power of two) where
                            the tap's values lie outside float16's comfortable range (:func:`storage_scale`):
                            stored = value x scale, read back divided by it
      /<split> attrs        rows_done

Writes go to ``<file>.partial``; every dataset is allocated when the file is created, so
a resumed run rewrites the same bytes in place and a full disk fails at once. Batches are held
in memory and written, one slice per tap, at most every ``COMMIT_SECONDS`` (``BUFFER_BYTES``);
``rows_done`` is brought up to date after they are flushed (a flush per batch would rewrite
whole chunks to disk each batch), so a killed run resumes from the last commit. The file is
renamed into place only once every split is complete. A file at the final name is therefore
always finished.

How long the extraction took lives beside the cache in ``<file>.timing.json`` (for the
report), not in the file: a resumed run must end with the same bytes as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np

from featcache._version import __version__
from featcache.errors import FeatcacheError
from featcache.files import atomic_write, lock

FORMAT = 1
CHUNK_BYTES = 1 << 20
CHUNK_CACHE_BYTES = 16 << 20  # per tap dataset: a batch fills chunks in memory, not by read-modify-write on disk
COMMIT_SECONDS = 0.25  # rows_done is brought up to date (two flushes) at most this often, and at the end
# Batches are held in memory until the next commit (or this many bytes) and written one slice per tap: a
# slice write costs h5py about half a millisecond whatever its size, and holds the GIL that the decoding
# and the network's host side need (on 8,192 32 px PNGs through resnet18 + mobilenet_v2, 258 writes of a
# batch each took 0.64 s)
BUFFER_BYTES = 32 << 20


# float16 keeps 11 significant bits between 2^-14 and 65,504. A tap whose first batch's largest |value| lies in
# [2^-8, 2^12] (pretrained networks' pooled features: tenths to hundreds; the tests' tiny network: hundredths) is
# stored as it is; one outside (random weights: efficientnet_b0's late stages near 1e-13) is multiplied by a power of
# two that brings that largest value to [16, 32): exact (a power of two changes only the exponent), the same two
# bytes a value, 2^11 of headroom above and 2^18 of normal range below it.
COMFORTABLE = (2.0**-8, 2.0**12)


def storage_scale(largest: float) -> float:
    """The power of two a float16 tap is stored multiplied by, from its first batch's largest |value|: 1 inside
    ``COMFORTABLE`` (and for a batch of zeros or non-finite values), else 2^(4 - floor(log2 largest))."""
    import math

    if not (math.isfinite(largest) and largest > 0) or COMFORTABLE[0] <= largest <= COMFORTABLE[1]:
        return 1.0
    return 2.0 ** (4 - math.floor(math.log2(largest)))


def stored_scale(dataset) -> float:
    """The scale a stored tap was multiplied by (1 where it carries none: every cache written before scales)."""
    scale = dataset.attrs.get("scale", 1.0)
    return float(scale) if np.isfinite(scale) and scale > 0 else 1.0


def canonical(fingerprint: dict) -> str:
    return json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))


def fingerprint_hash(fingerprint: dict) -> str:
    return hashlib.sha256(canonical(fingerprint).encode()).hexdigest()


def file_safe(backbone: str) -> str:
    """A backbone's name as part of a file or folder name: timm:NAME without its colon (Windows, scp, URLs),
    hf:ORG/NAME or hf:FOLDER without folders either."""
    return re.sub(r"[^A-Za-z0-9._+-]", "-", backbone)


def cache_file(cache_dir: Path, dataset_key: str, backbone: str, fingerprint: dict) -> Path:
    return Path(cache_dir) / dataset_key / f"{file_safe(backbone)}-{fingerprint_hash(fingerprint)[:12]}.h5"


def partial_file(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def write_error(path: Path, exc: BaseException) -> FeatcacheError:
    """One line for a failed write: a full disk and a read-only folder say so and name the fix."""
    text = str(exc)
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or "errno = 28" in text or "No space left" in text:
        return FeatcacheError(f"the disk is full: cannot write {path}; free some space or choose another "
                              f"--cache-dir, then run the same command again")
    if code in (errno.EROFS, errno.EACCES) or "errno = 30" in text or "errno = 13" in text:
        return FeatcacheError(f"cannot write {path}: the folder is read-only or not yours; choose another --cache-dir")
    return FeatcacheError(f"cannot write {path}: {text.splitlines()[0] if text else type(exc).__name__}")


def timing_file(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".timing.json")


def write_timing(path: Path, timing: dict) -> None:
    """Record how the cache at ``path`` was made; a failure here never fails the extraction."""
    with contextlib.suppress(OSError):
        atomic_write(timing_file(path), json.dumps(timing, indent=2, sort_keys=True))


def read_timing(path: Path) -> dict | None:
    try:
        return json.loads(timing_file(path).read_text())
    except (OSError, ValueError):
        return None


def locked(path: Path, on_wait=None):
    """Hold the exclusive lock for writing the cache ``path``; a second writer waits here."""
    return lock(path.with_name(path.name + ".lock"), on_wait, "cache folder", "choose another --cache-dir")


def _no_times_group(parent, name: str):
    """A group without modification times, so equal content gives equal bytes."""
    import h5py

    gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    gcpl.set_obj_track_times(False)
    return h5py.Group(h5py.h5g.create(parent.id, name.encode(), gcpl=gcpl))


def _preallocated(group, name: str, shape: tuple[int, int], dtype) -> None:
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    if shape[0] == 0:  # an empty shard (a rank with no batch of a split): nothing to chunk
        group.create_dataset(name, shape=shape, dtype=dtype, track_times=False)
        return
    rows = min(shape[0], CHUNK_BYTES // max(1, shape[1] * np.dtype(dtype).itemsize))
    group.create_dataset(name, shape=shape, dtype=dtype, chunks=(max(1, rows), shape[1]), dcpl=dcpl, track_times=False)


class CacheWriter:
    """Writes one cache file, resuming an earlier ``.partial`` of the same fingerprint.

    Args:
        path: the final file name; the writer works on ``path.partial``.
        fingerprint: everything that changes the numbers (stored as canonical JSON).
        splits: split name -> (labels, index[, official validation mask or None]) arrays; they fix the rows.
        tap_dims: tap name -> feature dimension after pooling.
        dtype: storage dtype, ``float16`` or ``float32``.
        classes: class names, stored for the stages that follow.
        run_attrs: settings a resume must reuse to write identical numbers
            (batch size, compile), read back through :attr:`run_attrs`.
    """

    def __init__(self, path, fingerprint, splits, tap_dims, dtype, classes, run_attrs):
        import h5py

        self.path = Path(path)
        self.partial = partial_file(self.path)
        self.resumed = False
        self._h5 = h5py
        self.file = None
        self._pending: dict[str, int] = {}  # split -> rows written but not yet in rows_done
        self._held: dict[str, dict] = {}  # split -> {"start", "stop", "taps": {tap: [arrays]}, "skipped": [arrays]}
        self._held_bytes = 0
        self._committed = time.monotonic()
        try:
            if self.partial.exists():
                self.file = self._resume(fingerprint, splits, tap_dims, dtype)
            if self.file is None:
                self.file = self._create(fingerprint, splits, tap_dims, dtype, classes, run_attrs)
        except (OSError, ValueError, RuntimeError) as exc:  # h5py reports a full disk as ValueError
            self.close()
            self.partial.unlink(missing_ok=True)
            raise write_error(self.partial, exc) from None
        self.done_at_open = sum(self.rows_done(name) for name in splits)

    def _create(self, fingerprint, splits, tap_dims, dtype, classes, run_attrs):
        self.partial.unlink(missing_ok=True)
        self.file = f = self._h5.File(self.partial, "w", track_order=False, rdcc_nbytes=CHUNK_CACHE_BYTES)
        f.attrs["fingerprint"] = canonical(fingerprint)
        f.attrs["format"] = FORMAT
        f.attrs["featcache_version"] = __version__
        f.attrs["classes"] = json.dumps(list(classes))
        f.attrs["run"] = json.dumps(run_attrs, sort_keys=True)
        f.attrs["complete"] = False
        for name, (labels, index, *official) in splits.items():
            group = _no_times_group(f, name)
            group.attrs["rows_done"] = 0
            group.create_dataset("labels", data=np.asarray(labels, np.int64), track_times=False)
            group.create_dataset("index", data=np.asarray(index, np.int64), track_times=False)
            if official and official[0] is not None:
                group.create_dataset("official_val", data=np.asarray(official[0], np.uint8), track_times=False)
            group.create_dataset("skipped", shape=(len(labels),), dtype=np.uint8, fillvalue=0, track_times=False)
            taps = _no_times_group(group, "taps")
            for tap, dim in tap_dims.items():
                _preallocated(taps, tap, (len(labels), dim), dtype)
        f.flush()
        return f

    def _resume(self, fingerprint, splits, tap_dims, dtype):
        """The open partial file if it matches this request exactly, else None."""
        try:
            f = self._h5.File(self.partial, "r+", rdcc_nbytes=CHUNK_CACHE_BYTES)
        except OSError:  # killed while HDF5 metadata was half written: start again
            return None
        try:
            ok = f.attrs.get("fingerprint") == canonical(fingerprint) and f.attrs.get("format") == FORMAT
            for name, (labels, *_) in splits.items():
                ok = ok and name in f and np.array_equal(f[name]["labels"][:], labels)
                ok = ok and all(f[name]["taps"][t].shape == (len(labels), d) for t, d in tap_dims.items())
                ok = ok and 0 <= int(f[name].attrs["rows_done"]) <= len(labels)
            ok = ok and all(f[n]["taps"][t].dtype == np.dtype(dtype) for n in splits for t in tap_dims)
        except (KeyError, OSError, ValueError):
            ok = False
        if not ok:
            f.close()
            return None
        self.resumed = any(int(f[name].attrs["rows_done"]) > 0 for name in splits)
        return f

    @property
    def run_attrs(self) -> dict:
        return json.loads(self.file.attrs["run"])

    def scale_for(self, split: str, tap: str, largest: float) -> float:
        """The scale ``tap``'s values of ``split`` are stored multiplied by: the one this file already holds (a
        resumed run keeps it), else :func:`storage_scale` of ``largest`` (the split's first batch), recorded before
        any of its rows are (float32 storage: 1)."""
        dataset = self.file[split]["taps"][tap]
        if dataset.dtype != np.float16:
            return 1.0
        if "scale" in dataset.attrs:
            return stored_scale(dataset)
        scale = storage_scale(largest)
        if scale != 1.0:
            dataset.attrs["scale"] = scale
        return scale

    def rows_done(self, split: str) -> int:
        """Rows of ``split`` written so far, committed or not."""
        return self._pending.get(split, int(self.file[split].attrs["rows_done"]))

    def write(self, split: str, start: int, features: dict[str, np.ndarray], skipped=None) -> None:
        """Store one batch of features at rows ``start:...`` and record the progress (held in memory and
        written with the batches next to it at the next commit: ``BUFFER_BYTES``).

        ``skipped`` marks rows whose image could not be read (their features are not used).
        """
        try:
            held = self._held.get(split)
            if held is not None and held["stop"] != start:  # not the next rows: the held ones go first
                self._write_held()
                held = None
            if held is None:
                held = self._held[split] = {"start": start, "stop": start, "taps": {}, "skipped": []}
            rows = 0
            for tap, values in features.items():
                held["taps"].setdefault(tap, []).append(values)
                rows = len(values)
                self._held_bytes += values.nbytes
            held["skipped"].append(np.zeros(rows, np.uint8) if skipped is None else np.asarray(skipped, np.uint8))
            held["stop"] = self._pending[split] = start + rows
            if time.monotonic() - self._committed >= COMMIT_SECONDS or self._held_bytes >= BUFFER_BYTES:
                self.commit()
        except (OSError, ValueError, RuntimeError) as exc:
            raise write_error(self.partial, exc) from None

    def _write_held(self) -> None:
        """The batches held in memory, one slice write per tap (and per split)."""
        for split, held in self._held.items():
            start, stop = held["start"], held["stop"]
            taps = self.file[split]["taps"]
            for tap, parts in held["taps"].items():
                taps[tap][start:stop] = parts[0] if len(parts) == 1 else np.concatenate(parts)
            skipped = np.concatenate(held["skipped"])
            if skipped.any():
                self.file[split]["skipped"][start:stop] = skipped
        self._held, self._held_bytes = {}, 0

    def commit(self) -> None:
        """Write the held batches and flush them, then record them in ``rows_done`` (what a resume trusts)."""
        try:
            self._write_held()
            if self._pending:
                self.file.flush()  # features reach the disk before rows_done says so
                for split, stop in self._pending.items():
                    self.file[split].attrs["rows_done"] = stop
                self.file.flush()
                self._pending = {}
        except (OSError, ValueError, RuntimeError) as exc:
            raise write_error(self.partial, exc) from None
        self._committed = time.monotonic()

    def skipped_rows(self, split: str) -> np.ndarray:
        self.commit()  # the batches held in memory too
        return np.flatnonzero(self.file[split]["skipped"][:])

    def finish(self, skipped: list[dict] | None = None) -> Path:
        """Mark complete and move into place atomically; ``skipped`` lists the unreadable images."""
        try:
            self.commit()
            if skipped:
                self.file.attrs["skipped_images"] = json.dumps(skipped)
            self.file.attrs["complete"] = True
            self.file.close()
            self.file = None
            os.replace(self.partial, self.path)
        except (OSError, ValueError, RuntimeError) as exc:
            raise write_error(self.partial, exc) from None
        return self.path

    def close(self) -> None:
        """Close without finishing: the partial file stays for a later resume, with every finished batch."""
        if self.file is not None:
            with contextlib.suppress(FeatcacheError):  # a full disk: what was committed stays
                self.commit()
            with contextlib.suppress(OSError, ValueError, RuntimeError):  # a full disk can fail the close too
                self.file.close()
            self.file = None


