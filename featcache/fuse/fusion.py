"""Stage 2: select taps, normalise each, concatenate (NumPy only, no I/O).

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


def parse_taps(text: str, backbones: tuple[str, ...]) -> tuple[TapRef, ...]:
    """``early,late`` (every backbone) or ``resnet50:late,mobilenet_v2:early`` -> TapRefs.

    Aliases resolve to node names; order follows the text, then the backbone order.
    """
    refs: list[TapRef] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise FeatcacheError(f"--taps has an empty entry: {text!r}")
        if ":" in item:
            name, tap = item.split(":", 1)
            if name not in backbones:
                raise unknown("--taps backbone", name, backbones)
            targets = [(name, tap)]
        else:
            targets = [(name, item) for name in backbones]
        for name, tap in targets:
            ref = TapRef(name, BACKBONES.lookup(name).tap(tap).node)
            if ref not in refs:
                refs.append(ref)
    return tuple(refs)


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
        self.dims_ = [b.shape[1] for b in blocks]
        if self.method == "standard":
            self.mean_ = [b.mean(axis=0, dtype=np.float64).astype(np.float32) for b in blocks]
            self.scale_ = [np.maximum(b.std(axis=0, dtype=np.float64), 1e-6).astype(np.float32) for b in blocks]
        return self

    def transform(self, blocks: list[np.ndarray]) -> np.ndarray:
        if [b.shape[1] for b in blocks] != self.dims_:
            raise FeatcacheError(f"tap dimensions {[b.shape[1] for b in blocks]} differ from the fitted {self.dims_}")
        out = []
        for i, block in enumerate(blocks):
            block = np.asarray(block, dtype=np.float32)
            if self.method == "standard":
                block = (block - self.mean_[i]) / self.scale_[i]
            elif self.method == "l2":
                block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
            out.append(block)
        return np.concatenate(out, axis=1)

    def fit_transform(self, blocks: list[np.ndarray]) -> np.ndarray:
        return self.fit(blocks).transform(blocks)
