"""Preprocessing: how images become backbone input, one rule for every path.

Stage 1 (**data** -> backbones). ``PreprocessConfig`` (image size, resize
rule, crop fraction, interpolation, mean/std: all of it in the cache fingerprint) and the
on-device half of the rule: uint8 batches resized and normalised where the network runs
(``to_input``). A field left None is the backbone's own (how its weights were trained):
:meth:`PreprocessConfig.resolved` fills it in before anything runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from featcache.errors import FeatcacheError, check_choice

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


RESIZES = ("center-crop", "stretch")
MAX_IMAGE_SIZE = 4096
INTERPOLATIONS = ("bilinear", "bicubic")
LEGACY = {"image_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear", "crop_pct": 1.0}
MODEL_FIELDS = tuple(LEGACY)  # None in a request: the backbone's own value


@dataclass(frozen=True)
class PreprocessConfig:
    """How images become backbone input; all of it is part of the fingerprint.

    ``center-crop``: the shorter side to ``image_size / crop_pct``, then the middle square of
    ``image_size``; ``stretch``: straight to ``image_size``. None fields take the backbone's
    values (:meth:`resolved`); the four study backbones' are the ``LEGACY`` ones. ``resize`` None is the
    model's own too: ``center-crop`` but where its weights were fed stretched (a Hugging Face ViT's processor).
    """

    image_size: int | None = 224
    resize: str | None = "center-crop"
    mean: tuple[float, float, float] | None = IMAGENET_MEAN
    std: tuple[float, float, float] | None = IMAGENET_STD
    interpolation: str | None = "bilinear"
    crop_pct: float | None = 1.0

    def __post_init__(self):
        if self.image_size is not None and self.image_size > MAX_IMAGE_SIZE:
            raise FeatcacheError(f"--image-size must be at most {MAX_IMAGE_SIZE} pixels (a batch of larger images does "
                                 f"not fit in memory). Got {self.image_size} instead.")
        if self.image_size is not None and self.image_size < 8:
            raise FeatcacheError(f"--image-size must be at least 8 pixels. Got {self.image_size} instead.")
        if self.resize is not None:
            check_choice("--resize", self.resize, RESIZES)
        if self.interpolation is not None:
            check_choice("--interpolation", self.interpolation, INTERPOLATIONS)
        if self.crop_pct is not None and not 0.1 <= self.crop_pct <= 1.0:
            raise FeatcacheError(f"--crop-pct must lie in [0.1, 1]. Got {self.crop_pct} instead.")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or (name == "std" and min(value) <= 0)):
                raise FeatcacheError(f"--{name} takes three comma-separated numbers (std above 0). Got {value} instead.")

    @classmethod
    def from_model(cls, **overrides) -> PreprocessConfig:
        """Every model field and the resize rule None (the backbone's own) except those given."""
        return cls(**{**dict.fromkeys(MODEL_FIELDS), "resize": None, **overrides})

    def resolved(self, defaults: dict) -> PreprocessConfig:
        """None fields filled from ``defaults`` (a backbone's input config; its resize rule is ``center-crop``
        unless it says)."""
        return PreprocessConfig(**{name: (getattr(self, name) if getattr(self, name) is not None else defaults[name])
                                   for name in MODEL_FIELDS},
                                resize=self.resize or defaults.get("resize", "center-crop"))

    def fields(self) -> dict:
        """The request as a run record's config keeps it (None: the backbone's own)."""
        return {"image_size": self.image_size, "resize": self.resize, "crop_pct": self.crop_pct,
                "interpolation": self.interpolation, "mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std)}

    @classmethod
    def from_fields(cls, config: dict) -> PreprocessConfig:
        """The request a record's config holds; a record older than these fields set size and resize only."""
        values = {name: config.get(name) for name in MODEL_FIELDS}
        values.update(mean=tuple(values["mean"]) if values["mean"] else None,
                      std=tuple(values["std"]) if values["std"] else None)
        return cls(**values, resize=config.get("resize", "center-crop"))

    def flags(self, skip: dict | None = None) -> list[str]:
        """The command-line flags that ask for this request's set fields, but those equal to ``skip``'s."""
        own = (skip or {}).get("resize", "center-crop")
        out = [] if self.resize in (None, own) else [f"--resize {self.resize}"]
        for name in MODEL_FIELDS:
            value = getattr(self, name)
            if value is not None and (skip is None or value != skip.get(name)):
                text = ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else value
                out.append(f"--{name.replace('_', '-')} {text}")
        return out

    def identity(self) -> dict:
        """The fingerprint's part: the four original keys, and the crop and interpolation only where they
        differ from what every cache before them used (so those caches keep their names). ``long_side``: a
        centre crop floors the resized longer side, as the libraries whose weights it feeds do (caches made
        before rounded it: a non-square photo's crop could sit half a pixel apart, so they are named apart)."""
        out = {"image_size": self.image_size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std)}
        if self.resize == "center-crop":
            out["long_side"] = "floor"
        if self.interpolation != LEGACY["interpolation"]:
            out["interpolation"] = self.interpolation
        if self.crop_pct != LEGACY["crop_pct"]:
            out["crop_pct"] = self.crop_pct
        return out


def to_input(images, pre: PreprocessConfig):
    """uint8 (N, H, W, 3) on the device -> normalised float (N, 3, S, S), channels_last.

    Normalising is affine per channel and resizing and cropping are linear, so they commute: the
    normalisation is one multiply-add on whichever side has fewer pixels (8x8 digits at 224 px: before
    the resize, 3x faster than three passes over the resized batch; the same values to float rounding).
    """
    import torch

    x = images.permute(0, 3, 1, 2).float()  # NHWC memory is channels_last
    scale, shift = _affine(tuple(pre.mean), tuple(pre.std), x.device)  # x * scale + shift = (x / 255 - mean) / std
    if x.shape[-2] * x.shape[-1] < pre.image_size**2:
        x = _fitted(torch.addcmul(shift, x, scale), pre, shift, scale * 255.0 + shift)
    else:
        x = torch.addcmul(shift, _fitted(x, pre, 0.0, 255.0), scale)
    return x.contiguous(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple, std: tuple, device):
    """(scale, shift) of the normalisation of 0-255 values, made once per device: a fresh host-to-GPU copy
    per batch would sync."""
    import torch

    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (mean, std))
    return (1.0 / (255.0 * std)).float().to(device), (-mean / std).float().to(device)


def resize_plan(h: int, w: int, pre: PreprocessConfig) -> tuple[int, int, int, int]:
    """The one resize rule: (resized height, width, crop top, left) for an h x w image.

    ``stretch``: straight to size x size. ``center-crop``: the shorter side to size / crop_pct,
    then the middle size x size. An image already size x size is taken as it is (files are
    fitted once when decoded, and later steps see them at the input size). The torch path (:func:`resized`) and the PIL path
    (``data.images.load_image``) both follow it.
    """
    size = pre.image_size
    if pre.resize == "stretch" or (h == w and pre.crop_pct == 1.0):
        return size, size, 0, 0
    short = size if pre.crop_pct == 1.0 else int(size / pre.crop_pct)  # timm / torchvision: floor
    # the longer side as torchvision's Resize (timm, OpenCLIP) and Hugging Face's processors take it: floored
    nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    return nh, nw, (nh - size) // 2, (nw - size) // 2


def resized(images, pre: PreprocessConfig):
    """uint8 (N, H, W, 3) -> float (N, 3, S, S) in [0, 1], resized as ``pre`` says (what the backbone sees)."""
    return _fitted(images.permute(0, 3, 1, 2).float().div_(255.0), pre, 0.0, 1.0)  # NHWC memory is channels_last


def _fitted(x, pre: PreprocessConfig, low, high):
    """float (N, 3, H, W) -> (N, 3, S, S) by the one resize rule; bicubic's overshoot clipped to [low, high]
    (PIL clips to the pixel range: the bounds are that range in ``x``'s units, per channel if tensors)."""
    import torch.nn.functional as F

    size = pre.image_size
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        nh, nw, top, left = resize_plan(h, w, pre)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode=pre.interpolation, antialias=True, align_corners=False)
            if pre.interpolation == "bicubic":
                x = x.clamp_(low, high)
        x = x[..., top : top + size, left : left + size]
    return x
