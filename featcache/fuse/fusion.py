"""Stage 5 (fuse): select taps, normalise each, concatenate (NumPy only, no I/O).

Flow: store -> **fusion** -> heads. The studies concatenate pooled features as they come;
ResNet50 + MobileNetV2 features differ in scale by an order of magnitude, so by default
each tap is standardised with statistics fitted on the training rows only before the
concatenation (``--tap-norm standard``); ``l2`` scales each tap's rows to unit length and
``none`` reproduces the studies' plain concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.backbones.registry import BACKBONES
from featcache.errors import FeatcacheError, unknown

TAP_NORMS = ("none", "standard", "l2")


@dataclass(frozen=True, order=True)
class TapRef:
    """One tap of one backbone, by its declared node name."""

    backbone: str
    tap: str

    def __str__(self):
        return f"{self.backbone}:{self.tap}"


MODULE_MARK = "module:"  # --taps module:NAME: the --module tap NAME (its plain name works as well)


def parse_taps(text: str, features) -> tuple[TapRef, ...]:
    """``early,late`` (every backbone) or ``resnet50:late,mobilenet_v2:early`` -> TapRefs, over the backbones of
    ``features`` (an ExtractConfig: its ``--module`` taps are taps too, by name or as ``module:NAME``).

    Aliases resolve to node names; order follows the text, then the backbone order.
    """
    backbones = features.backbones
    refs: list[TapRef] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise FeatcacheError(f"--taps has an empty entry: {text!r}")
        head, marked, module = item.rpartition(MODULE_MARK)
        if marked and (not head or head[:-1] in backbones):  # [BACKBONE:]module:NAME, a --module tap by its name
            if module not in {m for name in backbones for m in features.spec(name).modules}:
                raise FeatcacheError(f"--taps {item}: {module} is not among the --module taps of the request: add "
                                     f"--module {module}")
            item = head + module
        if ":" in item:
            name, tap = item.rsplit(":", 1)
            if name not in backbones:
                if name in BACKBONES:
                    raise FeatcacheError(f"--taps {item} names {name}, which is not among the backbones "
                                         f"({', '.join(backbones)}): add --backbone {name}")
                raise unknown("--taps backbone", name, backbones)
            targets = [(name, tap)]
        else:
            targets = [(name, item) for name in backbones]
        for name, tap in targets:
            ref = TapRef(name, features.spec(name).tap(tap).node)
            if ref not in refs:
                refs.append(ref)
    return tuple(refs)


def normalize_tap(block, method: str, mean=None, scale=None):
    """One tap's rows normalised: NumPy arrays or torch tensors alike.

    The one implementation: the cached path (:class:`TapNormalizer`), the streamed one and
    the fine-tuned model (``finetuning.model.TapNorm``) all call it.
    """
    if method == "standard":
        return (block - mean) / scale
    if method == "l2":
        return block / ((block * block).sum(axis=1, keepdims=True) ** 0.5).clip(min=1e-12)
    return block


RELATIVE_FLOOR = 1e-6


def _scale(std: np.ndarray) -> np.ndarray:
    """Each column's standard deviation, floored relative to the tap's largest (not at an absolute value): a tap
    of values near 1e-13 standardises as the same tap times 1e13 does. A column that barely moves next to its
    tap's others is not blown up; a constant tap keeps scale 1 (its centred values are 0 anyway)."""
    largest = float(std.max()) if std.size else 0.0
    floor = largest * RELATIVE_FLOOR if largest > 0 else 1.0
    return np.maximum(std, floor).astype(np.float32)


def column_moments(block: np.ndarray, rows: int = 4096, start=None) -> tuple[np.ndarray, np.ndarray]:
    """float64 sums of ``block``'s columns and of their squares, bit for bit what ``block.sum(0, dtype=float64)`` and
    ``np.square(block, dtype=float64).sum(0)`` give (each row added in turn), ``rows`` rows at a time: numpy's
    casting reductions took 2.0 s for 45,000 x 1,280 float32 rows on Zen 3, this 0.38 s, with no float64 copy of
    the whole block. ``start``: the (sums, squares) of the rows before (a streamed block's earlier chunks): the
    rows are added to them in turn, so a block streamed chunk by chunk sums bit for bit as it does whole."""
    sums, squares = np.zeros((2, block.shape[1])) if start is None else start
    for lo in range(0, len(block), rows):
        chunk = np.asarray(block[lo:lo + rows], dtype=np.float64)
        sums = np.add.reduce(np.concatenate([sums[None], chunk]), axis=0)
        squares = np.add.reduce(np.concatenate([squares[None], np.square(chunk)]), axis=0)
    return sums, squares


class TapNormalizer:
    """Per-tap normalisation fitted on training rows, then concatenation.

    Args:
        method: ``standard`` (zero mean, unit variance per feature, train statistics),
            ``l2`` (each tap's row scaled to unit length) or ``none``.
    """

    def __init__(self, method: str = "standard"):
        if method not in TAP_NORMS:
            raise unknown("--tap-norm", method, TAP_NORMS)
        self.method = method

    def fit(self, blocks: list[np.ndarray]) -> TapNormalizer:
        n = len(blocks[0]) if blocks else 0
        moments = [column_moments(b) for b in blocks]
        return self.fit_moments(n, [m[0] for m in moments], [m[1] for m in moments])

    def fit_moments(self, n: int, sums: list[np.ndarray], squares: list[np.ndarray]) -> TapNormalizer:
        """Fit from per-tap float64 sums of the rows and of their squares (in memory or streamed alike)."""
        self.dims_ = [len(s) for s in sums]
        if self.method == "standard":
            self.mean_ = [(s / n).astype(np.float32) for s in sums]
            self.scale_ = [_scale(np.sqrt(np.maximum(q / n - (s / n) ** 2, 0))) for s, q in zip(sums, squares)]
        return self

    def transform(self, blocks: list[np.ndarray], reuse: bool = False) -> np.ndarray:
        """The blocks normalised and side by side, float32. ``reuse``: one float32 block the caller gives up, which
        is normalised where it lies (no second array: fresh memory costs a page fault per 4 KiB here)."""
        if [b.shape[1] for b in blocks] != self.dims_:
            raise FeatcacheError(f"tap dimensions {[b.shape[1] for b in blocks]} differ from the fitted {self.dims_}")
        if self.method != "standard":
            return np.concatenate([normalize_tap(np.asarray(b, dtype=np.float32), self.method, *self.statistics(i))
                                   for i, b in enumerate(blocks)], axis=1)
        import torch

        # normalize_tap's (x - mean) / scale in float32, the same numbers, written in place into the fused array
        # by torch's threads (NumPy's float16 widening and two temporaries took 0.3 s per 45,000 x 1,280 tap)
        reuse = reuse and len(blocks) == 1 and blocks[0].dtype == np.float32 and blocks[0].flags.c_contiguous
        out = blocks[0] if reuse else np.empty((len(blocks[0]) if blocks else 0, sum(self.dims_)), np.float32)
        fused, lo = torch.from_numpy(out), 0
        for i, b in enumerate(blocks):
            part = fused[:, lo:lo + b.shape[1]]
            if not reuse:
                part.copy_(torch.from_numpy(np.asarray(b)))  # float16 widened exactly on the way
            part.sub_(torch.from_numpy(self.mean_[i])).div_(torch.from_numpy(self.scale_[i]))
            lo += b.shape[1]
        return out

    def statistics(self, i: int) -> tuple:
        """(mean, scale) of tap ``i`` for ``standard``, else (None, None)."""
        return (self.mean_[i], self.scale_[i]) if self.method == "standard" else (None, None)

    def fit_transform(self, blocks: list[np.ndarray]) -> np.ndarray:
        return self.fit(blocks).transform(blocks)


def fused_parts(X: dict, refs) -> dict:
    """{part: the taps ``refs`` of :func:`standardised`'s output side by side, in that order}."""
    import torch

    return {part: torch.cat([X[part][r] for r in refs], dim=1) for part in X}


def standardised(data, fit_rows, val_rows, device, test: bool = True) -> dict:
    """{"fit" | "val" | "test": {ref: float32 tensor}}, each tap of loaded caches standardised on the fit rows
    (fuse-train's rule): what the sweep, ``--taps auto`` and ``rank --confirm`` probe."""
    out = {"fit": {}, "val": {}, **({"test": {}} if test else {})}
    for (split, ref), block in data.taps.items():
        if split == "train":
            for part, tensor in standardised_tap(block, fit_rows, val_rows, data.taps[("test", ref)] if test else None,
                                                 device).items():
                out[part][ref] = tensor
    return out


def standardised_tap(train, fit_rows, val_rows, test, device) -> dict:
    """One tap's {"fit", "val"[, "test"]: float32 tensor}, standardised with the fit rows' statistics."""
    import torch

    parts = {"fit": train[fit_rows], "val": train[val_rows], **({"test": test} if test is not None else {})}
    norm = TapNormalizer("standard").fit([parts["fit"]])
    owned = {part for part, rows in parts.items() if rows is not test and not np.may_share_memory(rows, train)}
    return {part: torch.as_tensor(norm.transform([rows], reuse=part in owned), device=device)  # selections: copies
            for part, rows in parts.items()}
