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


def resize_plan(h: int, w: int, pre: PreprocessConfig) -> tuple[int, int, int, int]:
    """The one resize rule: (resized height, width, crop top, left) for an h x w image.

    ``stretch``: straight to size x size. ``center-crop``: the shorter side to size, then the
    middle size x size. The torch path (:func:`resized`) and the PIL path
    (``data.images.load_image``) both follow it.
    """
    size = pre.image_size
    if pre.resize == "stretch" or h == w:
        return size, size, 0, 0
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    return nh, nw, (nh - size) // 2, (nw - size) // 2


def resized(images, pre: PreprocessConfig):
    """uint8 (N, H, W, 3) -> float (N, 3, S, S) in [0, 1], resized as ``pre`` says (what the backbone sees)."""
    import torch.nn.functional as F

    x = images.permute(0, 3, 1, 2).float().div_(255.0)  # NHWC memory is channels_last
    size = pre.image_size
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        nh, nw, top, left = resize_plan(h, w, pre)
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        x = x[..., top : top + size, left : left + size]
    return x
