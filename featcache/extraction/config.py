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

from featcache.backbones.registry import BACKBONES, BackboneSpec
from featcache.backbones.spec import FLAT, LOGITS, POOLINGS, WHOLE
from featcache.backbones.modules import with_modules
from featcache.backbones.sources import with_logits
from featcache.backbones.sources.hf_models import allow_downloads
from featcache.backbones.weights import input_defaults, weights_identity
from featcache.data.datasets import DataRequest, dataset_identity, dataset_key
from featcache.data.preprocess import MODEL_FIELDS, PreprocessConfig
from featcache.data.source import SOURCE_FIELDS
from featcache.errors import FeatcacheError, check_choice
from featcache.device import DEVICES  # noqa: F401  (re-read by the requests below)
from featcache.extraction.store import FORMAT, cache_file, fingerprint_hash

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = ("float16", "float32")


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
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig.from_model)  # None fields: the backbone's
    pooling: str = "avg"
    precision: str = "auto"
    dtype: str = "float16"
    device: str = "auto"
    batch_size: int = 64
    num_workers: int | None = None  # processes decoding image files; None: workers_for(device)
    cache_dir: Path = Path("cache")
    compile: bool = False
    skip_bad_images: bool = False  # leave unreadable files out (recorded in the cache) instead of stopping
    logits: bool = False  # also cache the source classifier's output as a tap, ``logits`` (for LEEP and NCE)
    modules: tuple[str, ...] = ()  # named modules whose outputs are cached as taps of their own (--module)

    def __post_init__(self):
        if not self.backbones:
            raise FeatcacheError("name at least one --backbone")
        allow_downloads(self.data.download)  # hf: models come from the local cache unless --download
        check_choice("--pooling", self.pooling, POOLINGS)
        for name in self.backbones:
            spec = self.spec(name)  # a module a backbone lacks: said here
            if self.pooling.startswith("cls") and (spec.prefix_tokens == 0 or any(
                    t.layout not in ("tokens", *FLAT) and not t.pooling for t in spec.taps)):  # FLAT: kept whole
                raise FeatcacheError(f"--pooling {self.pooling} takes a transformer's class token; {name} has none: "
                                     f"use --pooling avg, max or avgmax")
        check_choice("--precision", self.precision, PRECISIONS)
        check_choice("--dtype", self.dtype, DTYPES)
        check_choice("--device", self.device, DEVICES)
        if self.batch_size < 1:
            raise FeatcacheError(f"--batch-size must be at least 1. Got {self.batch_size} instead.")
        if self.num_workers is not None and self.num_workers < 0:
            raise FeatcacheError(f"--num-workers must be 0 or more. Got {self.num_workers} instead.")

    def spec(self, name: str) -> BackboneSpec:
        """Backbone ``name``'s spec with this request's ``--module`` taps at its input size: what its cache holds
        (bar logits)."""
        spec = BACKBONES.lookup(name)
        if not self.modules:
            return spec
        return with_modules(spec, self.modules, self.preprocess.image_size or
                            input_defaults(spec, self.weights)["image_size"])

    def record_fields(self) -> dict:
        """The request as a run record's ``config`` holds it: the one writer of these keys (fuse-train and
        finetune add their own beside them), read back by :meth:`from_record`."""
        data = self.data
        return {"dataset": data.name, "data_dir": data.data_dir, "backbones": list(self.backbones),
                "weights": self.weights, **self.preprocess.fields(), "pooling": self.pooling,
                "precision": self.precision, "dtype": self.dtype, "seed": data.seed, "limit_train": data.limit_train,
                "limit_test": data.limit_test, "test_fraction": data.test_fraction, **data.source_fields(),
                **({"logits": True} if self.logits else {}),  # absent without it: earlier runs keep their keys
                **({"modules": list(self.modules)} if self.modules else {})}

    @classmethod
    def from_record(cls, config: dict, device: str = "cpu") -> ExtractConfig:
        """The request (dataset, backbones, weights, preprocessing) of a run record's ``config``."""
        data = DataRequest(name=config["dataset"], data_dir=config["data_dir"], limit_train=config["limit_train"],
                           limit_test=config["limit_test"], test_fraction=config["test_fraction"], seed=config["seed"],
                           **{name: config[name] for name in SOURCE_FIELDS if config.get(name) is not None})
        return cls(data=data, backbones=tuple(config["backbones"]), weights=config["weights"],
                   preprocess=PreprocessConfig.from_fields(config), pooling=config["pooling"], device=device,
                   logits=config.get("logits") is True, modules=tuple(config.get("modules") or ()))


def preprocess_for(cfg: ExtractConfig, spec: BackboneSpec) -> PreprocessConfig:
    """The request's preprocessing with its unset fields taken from how ``spec``'s weights were fed,
    checked against what the network can take."""
    pre = cfg.preprocess.resolved(input_defaults(spec, cfg.weights))
    if spec.input is not None and spec.input.fixed_size and pre.image_size != spec.input.image_size:
        raise FeatcacheError(f"{spec.name} takes {spec.input.image_size} x {spec.input.image_size} images only (its "
                             f"position embeddings or attention windows are built for that size): use --image-size {spec.input.image_size}")
    largest = max(t.stride for t in spec.taps)
    if pre.image_size < largest:
        raise FeatcacheError(f"--image-size {pre.image_size} is too small for {spec.name}, whose last stage reduces "
                             f"by {largest}: use --image-size {max(largest, 32)} or more")
    return pre


def shared_preprocess(cfg: ExtractConfig, why: str) -> PreprocessConfig:
    """The one preprocessing of every backbone, for paths that feed them the same images (fine-tuning,
    Grad-CAM); backbones that were trained with different ones are an error naming the flags."""
    resolved = {name: preprocess_for(cfg, BACKBONES.lookup(name)) for name in cfg.backbones}
    first = next(iter(resolved.values()))
    if any(pre != first for pre in resolved.values()):
        differ = {name for pre in resolved.values() for name in (*MODEL_FIELDS, "resize")
                  if getattr(pre, name) != getattr(first, name)}
        shown = "; ".join(f"{name}: {' '.join(f for f in pre.flags() if f.split()[0][2:].replace('-', '_') in differ)}"
                          for name, pre in resolved.items())
        raise FeatcacheError(f"{why} feeds every backbone the same images, but these were trained with different "
                             f"preprocessing ({shown}): give the flags that make them agree")
    return first


def fingerprint(cfg: ExtractConfig, spec: BackboneSpec, precision: str, dataset: dict | None = None) -> dict:
    """Everything that changes the numbers of one backbone's cache file.

    A discovered backbone adds the library versions that define it (``versions``); the four
    declared ones keep exactly the keys their existing caches were named with. ``dataset``:
    ``dataset_identity(cfg.data)`` when the caller already has it (a photo folder's identity
    reads every file's size and time: callers with several backbones read it once).
    """
    out = {
        "format": FORMAT,
        "backbone": spec.name,
        # a tap cached whole (an embedding, a vector or :flatten module) says so: pooling does not widen it
        # and a --module tap pooled its own way (NAME:cls) names its pooling
        "taps": [[t.node, t.channels, *([WHOLE] if t.layout in FLAT and t.node != LOGITS else
                                        [t.pooling] if t.pooling else [])] for t in spec.taps],
        "weights": weights_identity(spec, cfg.weights, cfg.data.seed),
        "preprocess": preprocess_for(cfg, spec).identity(),
        "pooling": cfg.pooling,
        "precision": precision,
        "dtype": cfg.dtype,
        "dataset": dataset_identity(cfg.data) if dataset is None else dataset,
    }
    if spec.versions:
        out["versions"] = spec.versions
    return out


@dataclass(frozen=True)
class CacheIdentity:
    """One backbone's cache file for a request: its fingerprint and path, made once.

    Extraction writes it, fuse-train and the sweep read it, finetune and the pipeline ledger key
    their results by it: all through :func:`cache_identities`.
    """

    backbone: str
    spec: BackboneSpec
    fingerprint: dict
    path: Path

    @property
    def hash(self) -> str:
        return fingerprint_hash(self.fingerprint)


def cache_identities(cfg: ExtractConfig, precision: str | None = None) -> dict[str, CacheIdentity]:
    """backbone -> its :class:`CacheIdentity`; ``precision`` resolved from the request's device when not given
    (extraction passes the one its process resolved, under torchrun each rank's)."""
    if precision is None:
        from featcache.device import resolve_device, resolve_precision

        precision = resolve_precision(cfg.precision, resolve_device(cfg.device))
    key, identity = dataset_key(cfg.data), dataset_identity(cfg.data)  # a folder's identity reads every file: once
    out = {}
    for name in cfg.backbones:
        spec = with_logits(cfg.spec(name)) if cfg.logits else cfg.spec(name)
        fp = fingerprint(cfg, spec, precision, identity)
        out[name] = CacheIdentity(name, spec, fp, cache_file(cfg.cache_dir, key, name, fp))
    return out
