"""Preprocessing: how images become backbone input, one rule for every path.

First box of the flow (**data** -> backbones). ``PreprocessConfig`` (image size, resize
rule, mean/std: all of it in the cache fingerprint) and the on-device half of the rule:
uint8 batches resized and normalised where the network runs (``to_input``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from featcache.errors import FeatcacheError, check_choice

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


RESIZES = ("center-crop", "stretch")


@dataclass(frozen=True)
class PreprocessConfig:
    """How images become backbone input; all of it is part of the fingerprint."""

    image_size: int = 224
    resize: str = "center-crop"  # shorter side to image_size, then centre crop; or "stretch"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.image_size < 8:
            raise FeatcacheError(f"--image-size must be at least 8 pixels. Got {self.image_size} instead.")
        check_choice("--resize", self.resize, RESIZES)


def to_input(images, pre: PreprocessConfig):
    """uint8 (N, H, W, 3) on the device -> normalised float (N, 3, S, S), channels_last."""
    import torch

    x = resized(images, pre)
    mean, std = _mean_std(tuple(pre.mean), tuple(pre.std), x.device)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=16)
def _mean_std(mean: tuple, std: tuple, device):
    """Normalisation constants on the device, made once: a fresh host-to-GPU copy per batch would sync."""
    import torch

    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


def resized(images, pre: PreprocessConfig):
    """uint8 (N, H, W, 3) -> float (N, 3, S, S) in [0, 1], resized as ``pre`` says (what the backbone sees)."""
    import torch.nn.functional as F

    x = images.permute(0, 3, 1, 2).float().div_(255.0)  # NHWC memory is channels_last
    size = pre.image_size
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        if pre.resize == "stretch" or h == w:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        else:
            scale = size / min(h, w)
            nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
            top, left = (nh - size) // 2, (nw - size) // 2
            x = x[..., top : top + size, left : left + size]
    return x
