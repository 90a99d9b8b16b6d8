"""Reading a cache file: what the later stages see of the extraction's output.

Between extraction and fuse (store -> **reader** -> fusion). Opens only finished files (or,
on request, a partial one), checks the format, and reads taps by split, skipping the rows
whose images could not be read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError
from featcache.backbones.spec import LOGITS, WHOLE, pooled_dim
from featcache.extraction.store import canonical, stored_scale

FLOAT16_TINY = 2.0**-14  # smallest normal float16
HEALTH_ROWS = 4096  # rows read at a time when checking a tap (bounded memory, as --out-of-core needs)


class TapHealth:
    """Whether a tap's training rows carry usable signal, accumulated over row chunks.

    Dead: every column constant over the rows (e.g. a block stored as all zeros), or, in
    float16 storage, most nonzero values below float16's normal range (subnormal: a few
    significant bits left, or rounded to zero).
    """

    def __init__(self, stored_float16: bool, scale: float = 1.0):
        self.float16, self.scale = stored_float16, scale  # scale: what the values were stored multiplied by
        self.rows, self.lo, self.hi = 0, None, None
        self.nonzero = self.tiny = self.nonfinite = 0
        self.largest = 0.0

    def update(self, block: np.ndarray) -> TapHealth:
        block = np.asarray(block, dtype=np.float32)
        finite = np.isfinite(block)
        if not finite.all():  # a damaged file: counted, and the rest judged on the finite values
            self.nonfinite += int(block.size - np.count_nonzero(finite))
            block = np.where(finite, block, 0.0)
        if len(block):
            lo, hi = block.min(axis=0), block.max(axis=0)
            self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
            self.hi = hi if self.hi is None else np.maximum(self.hi, hi)
            magnitude = np.abs(block)
            self.nonzero += np.count_nonzero(magnitude)
            self.tiny += np.count_nonzero((magnitude > 0) & (magnitude * self.scale < FLOAT16_TINY))
            self.largest = max(self.largest, float(magnitude.max()))
        self.rows += len(block)
        return self

    def dead(self) -> str | None:
        """Why the tap is dead, in a few words, or None if it is not."""
        if self.nonfinite:
            return f"{self.nonfinite} stored values are not finite (NaN or infinity): the file is damaged"
        if self.rows > 1 and np.array_equal(self.lo, self.hi):
            value = float(self.lo.flat[0]) + 0.0 if self.lo.size else 0.0  # + 0.0: -0 reads as 0
            return f"constant over every training image (all {value:.3g})"
        if self.float16 and self.nonzero and self.tiny > self.nonzero / 2:
            return (f"{self.tiny / self.nonzero:.0%} of its nonzero values lie below float16's normal range "
                    f"(largest {self.largest * self.scale:.2g} as stored)")
        return None


class FeatureCache:
    """Read access to a finished cache file (or, with ``allow_partial``, a partial one)."""

    def __init__(self, path, allow_partial: bool = False, expected: dict | None = None):
        """Open ``path``; a finished cache is checked before anything is read: its metadata parses, its
        splits and shapes are those its fingerprint declares (no absurd allocation), and, given
        ``expected`` (the request's fingerprint), it is the cache of that request."""
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise FeatcacheError(f"no cache file at {self.path}")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise FeatcacheError(f"{self.path} is not a readable HDF5 feature cache ({exc})") from exc
        if "fingerprint" not in self.file.attrs:
            self.file.close()
            raise FeatcacheError(f"{self.path} is an HDF5 file but not a featcache cache (no fingerprint)")
        self._kept_rows: dict[str, np.ndarray | slice] = {}
        self._health: dict[str, str | None] = {}
        try:
            if not (allow_partial or bool(self.file.attrs.get("complete", False))):
                raise FeatcacheError(f"{self.path} is not finished: re-run the featcache extract command that made it")
            if expected is not None and canonical(self.fingerprint) != canonical(expected):
                raise FeatcacheError(f"{self.path} holds another request's features (its stored fingerprint differs "
                                     f"from this request's): delete it and run featcache extract again")
            if self.complete:
                self._check_layout()
        except FeatcacheError:
            self.file.close()
            raise
        except (KeyError, OSError, ValueError, TypeError, AttributeError) as exc:  # h5py's errors on damaged metadata
            self.file.close()
            raise FeatcacheError(f"{self.path} is a damaged feature cache ({type(exc).__name__}: "
                                 f"{str(exc)[:120]}): delete it and run featcache extract again") from None

    def _check_layout(self) -> None:
        """Each split holds labels, index and every declared tap with the same rows, each tap as wide as the
        fingerprint declares: read from the metadata alone, before any array is read or allocated."""
        fingerprint = self.fingerprint
        if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("taps"), list):
            raise FeatcacheError(f"{self.path} is a damaged feature cache (its fingerprint lists no taps): delete "
                                 f"it and run featcache extract again")
        pooling = fingerprint.get("pooling")
        widths = {str(entry[0]): int(entry[1]) if entry[0] == LOGITS or entry[2:] == [WHOLE]  # cached as they are
                  else pooled_dim(int(entry[1]), entry[2] if len(entry) > 2 else pooling)  # a tap's own pooling
                  for entry in fingerprint["taps"]}
        json.loads(self.file.attrs["classes"])
        for split in ("train", "test"):
            if split not in self.file or "taps" not in self.file[split] or "labels" not in self.file[split]:
                raise FeatcacheError(f"{self.path} is a damaged feature cache (no {split} split): delete it and run "
                                     f"featcache extract again")
            group = self.file[split]
            rows = group["labels"].shape
            if len(rows) != 1 or group["index"].shape != rows:
                raise FeatcacheError(f"{self.path} is a damaged feature cache ({split} labels of shape {rows}): "
                                     f"delete it and run featcache extract again")
            for tap, data in group["taps"].items():
                want = (rows[0], widths.get(tap, -1))
                if data.shape != want:
                    raise FeatcacheError(f"{self.path} is a damaged feature cache ({split} tap {tap} has shape "
                                         f"{data.shape}, its fingerprint declares {want}): delete it and run "
                                         f"featcache extract again")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.file.close()

    @property
    def fingerprint(self) -> dict:
        try:
            return json.loads(self.file.attrs["fingerprint"])
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise FeatcacheError(f"{self.path} is a damaged feature cache (its fingerprint is not JSON: {exc}): "
                                 f"delete it and run featcache extract again") from None

    @property
    def classes(self) -> list[str]:
        return json.loads(self.file.attrs["classes"])

    @property
    def complete(self) -> bool:
        return bool(self.file.attrs["complete"])

    @property
    def splits(self) -> list[str]:
        """train first, then test (HDF5 lists groups alphabetically)."""
        return sorted(self.file.keys(), key=lambda s: (s != "train", s))

    def taps(self, split: str) -> dict[str, tuple[int, ...]]:
        return {name: ds.shape for name, ds in self.file[split]["taps"].items()}

    def rows_done(self, split: str) -> int:
        return int(self.file[split].attrs["rows_done"])

    def _kept(self, split: str) -> np.ndarray | slice:
        """Rows to serve: all but the images skipped as unreadable (``--skip-bad-images``).

        Read once per split: streaming reads ask for it with every chunk.
        """
        if split not in self._kept_rows:
            group = self.file[split]
            skipped = group["skipped"][:] if "skipped" in group else np.zeros(0, np.uint8)
            self._kept_rows[split] = np.flatnonzero(skipped == 0) if skipped.any() else slice(None)
        return self._kept_rows[split]

    @property
    def skipped(self) -> list[dict]:
        """The images skipped as unreadable: split, index, file, error."""
        return json.loads(self.file.attrs.get("skipped_images", "[]"))

    def n_rows(self, split: str) -> int:
        """Rows served (skipped images excluded)."""
        kept = self._kept(split)
        return len(self.file[split]["labels"]) if isinstance(kept, slice) else len(kept)

    def labels(self, split: str) -> np.ndarray:
        return self.file[split]["labels"][:][self._kept(split)]

    def official_val(self, split: str = "train") -> np.ndarray | None:
        """bool per served row: the dataset's own validation split (None where the dataset has none)."""
        group = self.file[split]
        if "official_val" not in group:
            return None
        raw = group["official_val"][:]
        if raw.shape != group["labels"].shape:
            raise FeatcacheError(f"{self.path} is a damaged feature cache (official_val does not match the rows): "
                                 f"delete it and run featcache extract again")
        return raw.astype(bool)[self._kept(split)]

    def index(self, split: str) -> np.ndarray:
        return self.file[split]["index"][:][self._kept(split)]

    def read(self, split: str, tap: str, rows=None) -> np.ndarray:
        """A tap's features (N, C); ``rows`` (a slice of served rows) reads a chunk only. A tap stored multiplied by
        a scale (float16 outside its range: store.storage_scale) is divided by it, as float32."""
        kept = self._kept(split)
        data = self.file[split]["taps"][tap]
        if isinstance(kept, slice):
            values = data[rows if rows is not None else slice(None)]
        else:
            wanted = kept if rows is None else kept[rows]
            values = data[0:0] if len(wanted) == 0 else data[int(wanted[0]) : int(wanted[-1]) + 1][wanted - wanted[0]]
        scale = stored_scale(data)
        return values if scale == 1.0 else float32(values) / np.float32(scale)

    def dead(self, tap: str, rows: np.ndarray | None = None) -> str | None:
        """Why ``tap`` is dead on the training rows (see :class:`TapHealth`), or None. Checked in row
        chunks; ``rows``, the tap's training rows already read by the caller, are not read again."""
        if tap not in self._health:
            stored = self.file["train"]["taps"][tap]
            health = TapHealth(stored.dtype == np.float16, stored_scale(stored))
            for start in range(0, self.n_rows("train"), HEALTH_ROWS):
                chunk = slice(start, start + HEALTH_ROWS)
                health.update(rows[chunk] if rows is not None else self.read("train", tap, chunk))
            self._health[tap] = health.dead()
        return self._health[tap]

    def tap_names(self, split: str) -> list[str]:
        """The split's taps in network order (the order the fingerprint lists them), not HDF5's alphabetical one."""
        stored = self.file[split]["taps"]
        ordered = [entry[0] for entry in self.fingerprint.get("taps", []) if entry[0] in stored]  # [name, width, ...]
        return ordered + sorted(set(stored) - set(ordered))

    def summary(self) -> dict:
        """Everything ``featcache info`` shows, as plain data (``featcache info --json``)."""
        splits = {}
        for split in self.splits:
            group = self.file[split]
            splits[split] = {
                "rows_done": self.rows_done(split), "rows": len(group["labels"]),
                "dtype": str(group["taps"][self.tap_names(split)[0]].dtype) if len(group["taps"]) else None,
                "taps": {tap: list(group["taps"][tap].shape) for tap in self.tap_names(split)},
            }
        dead = {tap: reason for tap in self.tap_names("train") if self.complete and (reason := self.dead(tap))}
        return {"path": str(self.path), "complete": self.complete, "classes": self.classes, "splits": splits,
                "dead_taps": dead, "skipped": self.skipped, "fingerprint": self.fingerprint}

    def describe(self) -> str:
        """A human summary: state, classes, per split rows and taps (dead ones flagged), a short fingerprint."""
        info = self.summary()
        lines = [f"{self.path}", f"  state: {'complete' if self.complete else 'partial (re-run extract to resume)'}"]
        lines.append(f"  classes ({len(self.classes)}): {', '.join(self.classes)}")
        for split, about in info["splits"].items():
            lines.append(f"  {split}: {about['rows_done']}/{about['rows']} rows, dtype {about['dtype'] or '-'}")
            width = max([14, *map(len, about["taps"])])  # a --module tap's name may be long
            for tap, (n, c) in about["taps"].items():
                dead = info["dead_taps"].get(tap) if split == "train" else None
                lines.append((f"    {tap:<{width}} {f'{n} x {c}':<13}" + (f"  DEAD: {dead}" if dead else "")).rstrip())
        if info["dead_taps"]:
            lines.append("  dead taps carry no signal: fuse-train refuses them without --allow-dead-taps; "
                         "extract with --dtype float32 to keep small values")
        if self.skipped:
            lines.append(f"  skipped as unreadable ({len(self.skipped)}):")
            lines.extend(f"    {s['split']} row {s['index']}: {s['error']}" for s in self.skipped)
        lines.append("  fingerprint (all of it: featcache info --json):")
        for key, value in self.fingerprint.items():
            if key != "taps":
                text = (", ".join(f"{k}={_short(v)}" for k, v in sorted(value.items())) if isinstance(value, dict)
                        else _short(value))
                lines.append(f"    {key:<11} {text if len(text) <= 90 else text[:89] + '…'}")
        return "\n".join(lines)


def float32(values: np.ndarray) -> np.ndarray:
    """``values`` as float32 (the same array where it is one). Large float16 blocks widen through torch's vectorised
    conversion: numpy's took 4.4 s against torch's 0.10 s for a 50,000 x 1,280 tap on Zen 3 (an exact widening:
    the same values)."""
    if values.dtype == np.float32:
        return values
    if values.dtype == np.float16 and values.size >= 1 << 20:
        import torch

        out = np.empty(values.shape, np.float32)  # numpy's allocation: too little memory is a MemoryError, as before
        torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(values)))
        return out
    return values.astype(np.float32)


def _short(value) -> str:
    """A fingerprint value in a few characters: a string as it is, a list of numbers as 0.485/0.456/0.406."""
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return "/".join(f"{v:g}" for v in value)
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
