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


class FeatureCache:
    """Read access to a finished cache file (or, with ``allow_partial``, a partial one)."""

    def __init__(self, path, allow_partial: bool = False):
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
        if not (allow_partial or bool(self.file.attrs["complete"])):
            self.file.close()
            raise FeatcacheError(f"{self.path} is not finished: re-run the featcache extract command that made it")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.file.close()

    @property
    def fingerprint(self) -> dict:
        return json.loads(self.file.attrs["fingerprint"])

    @property
    def classes(self) -> list[str]:
        return json.loads(self.file.attrs["classes"])

    @property
    def complete(self) -> bool:
        return bool(self.file.attrs["complete"])

    @property
    def splits(self) -> list[str]:
        return list(self.file.keys())

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

    def index(self, split: str) -> np.ndarray:
        return self.file[split]["index"][:][self._kept(split)]

    def read(self, split: str, tap: str, rows=None) -> np.ndarray:
        """A tap's features (N, C); ``rows`` (a slice of served rows) reads a chunk only."""
        kept = self._kept(split)
        data = self.file[split]["taps"][tap]
        if isinstance(kept, slice):
            return data[rows if rows is not None else slice(None)]
        wanted = kept if rows is None else kept[rows]
        if len(wanted) == 0:
            return data[0:0]
        return data[int(wanted[0]) : int(wanted[-1]) + 1][wanted - wanted[0]]

    def describe(self) -> str:
        """A human summary: state, classes, per split rows and taps, fingerprint."""
        lines = [f"{self.path}", f"  state: {'complete' if self.complete else 'partial (re-run extract to resume)'}"]
        lines.append(f"  classes ({len(self.classes)}): {', '.join(self.classes)}")
        for split in self.splits:
            taps = self.taps(split)
            n = len(self.file[split]["labels"])
            dtype = next(iter(self.file[split]["taps"].values())).dtype if taps else "-"
            lines.append(f"  {split}: {self.rows_done(split)}/{n} rows, dtype {dtype}")
            lines.extend(f"    {tap:<14} {shape[0]} x {shape[1]}" for tap, shape in taps.items())
        if self.skipped:
            lines.append(f"  skipped as unreadable ({len(self.skipped)}):")
            lines.extend(f"    {s['split']} row {s['index']}: {s['error']}" for s in self.skipped)
        lines.append("  fingerprint:")
        lines.extend("    " + line for line in json.dumps(self.fingerprint, indent=2, sort_keys=True).splitlines())
        return "\n".join(lines)
