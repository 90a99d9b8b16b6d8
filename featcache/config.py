"""Frozen per-stage configuration and the cache fingerprint.

The CLI builds these dataclasses from flags; tests build them directly. The fingerprint
holds everything that changes the stored numbers and nothing that does not (batch size,
workers and device choice change speed only), so an identical request is a cache hit
and any numeric change is a miss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from featcache.backbones import BACKBONES, BackboneSpec, weights_identity
from featcache.datasets import DataRequest, dataset_identity
from featcache.errors import FeatcacheError, unknown
from featcache.store import FORMAT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLINGS = ("avg", "max", "avgmax")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = ("float16", "float32")
RESIZES = ("center-crop", "stretch")
DEVICES = ("auto", "cpu", "cuda")


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise unknown(option, value, allowed)


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
        _choice("--resize", self.resize, RESIZES)


@dataclass(frozen=True)
class ExtractConfig:
    """Flags of ``featcache extract``."""

    data: DataRequest = field(default_factory=DataRequest)
    backbones: tuple[str, ...] = ("resnet50",)
    weights: str = "imagenet"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    pooling: str = "avg"
    precision: str = "auto"
    dtype: str = "float16"
    device: str = "auto"
    batch_size: int = 64
    num_workers: int = 2
    cache_dir: Path = Path("cache")
    compile: bool = False
    skip_bad_images: bool = False  # leave unreadable files out (recorded in the cache) instead of stopping

    def __post_init__(self):
        if not self.backbones:
            raise FeatcacheError("name at least one --backbone")
        for name in self.backbones:
            BACKBONES.lookup(name)
        _choice("--pooling", self.pooling, POOLINGS)
        _choice("--precision", self.precision, PRECISIONS)
        _choice("--dtype", self.dtype, DTYPES)
        _choice("--device", self.device, DEVICES)
        if self.batch_size < 1:
            raise FeatcacheError(f"--batch-size must be at least 1. Got {self.batch_size} instead.")
        if self.num_workers < 0:
            raise FeatcacheError(f"--num-workers must be 0 or more. Got {self.num_workers} instead.")


def resolve_device(name: str):
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise FeatcacheError("--device cuda was asked for but torch sees no CUDA GPU: use --device cpu or auto")
    return torch.device(name)


def resolve_precision(precision: str, device) -> str:
    """``auto`` -> bf16 (or fp16) autocast on GPU, fp32 on CPU (no fast bf16 assumed)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def fingerprint(cfg: ExtractConfig, spec: BackboneSpec, precision: str) -> dict:
    """Everything that changes the numbers of one backbone's cache file."""
    return {
        "format": FORMAT,
        "backbone": spec.name,
        "taps": [[t.node, t.channels] for t in spec.taps],
        "weights": weights_identity(spec, cfg.weights, cfg.data.seed),
        "preprocess": {
            "image_size": cfg.preprocess.image_size,
            "resize": cfg.preprocess.resize,
            "mean": list(cfg.preprocess.mean),
            "std": list(cfg.preprocess.std),
        },
        "pooling": cfg.pooling,
        "precision": precision,
        "dtype": cfg.dtype,
        "dataset": dataset_identity(cfg.data),
    }
