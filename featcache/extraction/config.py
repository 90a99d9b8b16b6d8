"""Frozen per-stage configuration and the cache fingerprint.

The CLI builds these dataclasses from flags; tests build them directly. The fingerprint
holds everything that changes the stored numbers and nothing that does not (batch size,
workers and device choice change speed only), so an identical request is a cache hit
and any numeric change is a miss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from featcache.backbones.registry import BACKBONES, BackboneSpec, weights_identity
from featcache.data.datasets import DataRequest, dataset_identity
from featcache.data.preprocess import PreprocessConfig
from featcache.errors import FeatcacheError, check_choice
from featcache.extraction.store import FORMAT

POOLINGS = ("avg", "max", "avgmax")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = ("float16", "float32")
DEVICES = ("auto", "cpu", "cuda")


def available_cores() -> int:
    """The CPU cores this process may run on: how many image files decode at once by default."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def workers_for(device, asked: int | None) -> int:
    """Processes decoding image files: ``asked``, or by default every core for a GPU run and none for a
    CPU run, whose network already uses every core: worker processes only take cores from it, and
    decoding between batches was faster (benchmarks/folder_throughput.py, benchmarks/RESULTS.md)."""
    if asked is not None:
        return asked
    return available_cores() if getattr(device, "type", device) == "cuda" else 0


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
    num_workers: int | None = None  # processes decoding image files; None: workers_for(device)
    cache_dir: Path = Path("cache")
    compile: bool = False
    skip_bad_images: bool = False  # leave unreadable files out (recorded in the cache) instead of stopping

    def __post_init__(self):
        if not self.backbones:
            raise FeatcacheError("name at least one --backbone")
        for name in self.backbones:
            BACKBONES.lookup(name)
        check_choice("--pooling", self.pooling, POOLINGS)
        check_choice("--precision", self.precision, PRECISIONS)
        check_choice("--dtype", self.dtype, DTYPES)
        check_choice("--device", self.device, DEVICES)
        if self.batch_size < 1:
            raise FeatcacheError(f"--batch-size must be at least 1. Got {self.batch_size} instead.")
        if self.num_workers is not None and self.num_workers < 0:
            raise FeatcacheError(f"--num-workers must be 0 or more. Got {self.num_workers} instead.")


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
