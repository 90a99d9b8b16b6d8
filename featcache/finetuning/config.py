"""The fine-tune's configuration: flags, the record's view of them, where an unfinished run works.

Inside finetuning (config -> model / loop -> run). Also read back by the reporting stage
(a fine-tuned run's config rebuilt from its record).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from featcache.backbones.registry import BACKBONES
from featcache.data.augment import AUGMENTS
from featcache.errors import FeatcacheError, require, unknown
from featcache.extraction.config import ExtractConfig
from featcache.finetuning.model import parse_policy
from featcache.fuse.fusion import TapNormalizer
from featcache.fuse.heads import heads_for
from featcache.requests import request_hash
from featcache.runs.records import RunRecord


@dataclass(frozen=True)
class FinetuneConfig:
    """Flags of ``featcache finetune``."""

    features: ExtractConfig = field(default_factory=ExtractConfig)
    taps: str = "late"
    head: str = "mlp"
    hidden: tuple[int, ...] = (512,)
    dropout: float = 0.2
    res_blocks: int = 2
    tap_norm: str = "standard"
    unfreeze: str = "last-block"
    head_epochs: int = 0
    epochs: int = 6
    optimizer: str = "adamw"
    lr: float = 1e-4
    backbone_lr_scale: float = 0.1
    batch_size: int = 32
    augment: str = "none"
    val_fraction: float = 0.1
    patience: int | None = None
    init_head: Path | None = None
    runs_dir: Path = Path("runs")
    resume: bool = False
    num_workers: int = 2

    def __post_init__(self):
        if self.head not in heads_for("finetune"):
            raise unknown("--head", self.head, heads_for("finetune"))
        if self.augment not in AUGMENTS:
            raise unknown("--augment", self.augment, AUGMENTS)
        TapNormalizer(self.tap_norm)
        parse_policy(self.unfreeze)
        if self.features.modules:
            raise FeatcacheError("--module taps are cached frozen features: fuse-train and sweep them; finetune "
                                 "trains at the model's own taps (drop --module)")
        if self.epochs < 0 or self.head_epochs < 0 or self.epochs + self.head_epochs < 1:
            raise FeatcacheError("--epochs and --head-epochs must be 0 or more, and train at least one epoch together")
        if self.init_head is not None and self.head_epochs:
            raise FeatcacheError("--init-head replaces phase 1: leave --head-epochs at 0")
        if self.head == "resblocks" and len(self.features.backbones) != 1:
            raise FeatcacheError("--head resblocks refines one backbone's feature map: give exactly one --backbone")
        require(self.batch_size >= 1, "--batch-size", self.batch_size, "be at least 1")
        require(0 <= self.dropout < 1, "--dropout", self.dropout, "lie in [0, 1)")
        require(self.lr > 0, "--lr", self.lr, "be positive")


def partial_dir(cfg: FinetuneConfig) -> Path:
    """Where an unfinished fine-tune keeps its checkpoint: fixed by what changes the result."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "num_workers", "runs_dir")}
    return Path(cfg.runs_dir) / f".finetune-{request_hash(settings, 12)}.partial"


def config_dict(cfg: FinetuneConfig) -> dict:
    out = {k: v for k, v in asdict(cfg).items() if k not in ("features",)}
    return {**out, **cfg.features.record_fields(), "dtype": "float32"}  # the fine-tune's features are never stored


def finetune_config_from_record(record: RunRecord) -> FinetuneConfig:

    c = record.config
    return FinetuneConfig(features=ExtractConfig.from_record(record.config), taps=",".join(record.taps), head=c["head"],
                          hidden=tuple(c["hidden"]), dropout=c["dropout"], res_blocks=c["res_blocks"],
                          tap_norm=c["tap_norm"], unfreeze=c["unfreeze"], epochs=max(1, c["epochs"]))


def check_resblocks_taps(refs) -> None:
    """``--head resblocks`` refines one convolutional feature map."""
    if len(refs) != 1:
        raise FeatcacheError("--head resblocks refines one feature map: give one tap, e.g. --taps late")
    if BACKBONES.lookup(refs[0].backbone).tap(refs[0].tap).layout != "nchw":
        raise FeatcacheError(f"--head resblocks refines a convolutional feature map; {refs[0]} is a transformer's "
                             f"tokens: use --head mlp or linear")


def check_one_image_batches(ref, image_size: int, batch_size: int, rows: int) -> None:
    """The residual blocks' BatchNorm cannot train on one value per channel: a 1x1 map in a batch of one."""
    stride = BACKBONES.lookup(ref.backbone).tap(ref.tap).stride
    if math.ceil(image_size / stride) == 1 and (batch_size == 1 or rows % batch_size == 1):
        batch = "--batch-size 1" if batch_size == 1 else f"the last batch ({rows} images, batches of {batch_size})"
        raise FeatcacheError(f"--head resblocks: {ref} is 1x1 at --image-size {image_size} and {batch} holds one "
                             f"image, which leaves BatchNorm one value per channel: use --image-size {2 * stride} "
                             f"or more")
