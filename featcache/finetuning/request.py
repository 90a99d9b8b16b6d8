"""``FinetuneRequest``: what ``featcache finetune`` (its API function and pipeline table) asks for.

Inside finetuning (request -> config -> model / loop -> run): the fields, and the one place they
become a :class:`~featcache.finetuning.config.FinetuneConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featcache.data.augment import AUGMENTS
from featcache.extraction.request import FeatureFields
from featcache.fuse.fusion import TAP_NORMS
from featcache.fuse.heads import heads_for, heads_help
from featcache.fuse.options import OPTIMIZERS
from featcache.requests import carried, device_option, option, quiet_option, runs_dir_option
from featcache.runs.request import TRUST_PICKLES


@dataclass(frozen=True)
class FinetuneRequest(FeatureFields):
    """``featcache finetune``: train unfrozen variants end to end."""

    taps: str = option("late", metavar="TAPS", help="Taps to fuse (as in fuse-train), e.g. late or early,late.")
    head: str = option("mlp", choices=lambda: heads_for("finetune"), help=lambda: heads_help("finetune"))
    hidden: tuple[int, ...] = option((512,), metavar="W[,W]", help="Head hidden widths, e.g. 512 or 512,256.")
    dropout: float = option(0.2, help="Dropout of the head's hidden layers.")
    res_blocks: int = option(2, help="Residual blocks of --head resblocks.")
    tap_norm: str = option("standard", choices=TAP_NORMS, help="Per-tap normalisation, fitted on train.")
    unfreeze: str = option("last-block", metavar="POLICY",
                           help="Phase 2 trainable backbone part: none, last-block, last-N (blocks) or all.")
    head_epochs: int = option(0, help="Phase 1: epochs training only the head.")
    epochs: int = option(6, help="Phase 2: epochs with the unfreeze policy.")
    optimizer: str = option("adamw", choices=OPTIMIZERS, help="The optimizer.")
    lr: float = option(1e-4, help="Head learning rate.")
    backbone_lr_scale: float = option(0.1, help="Backbone learning rate = --lr x this, in phase 2.")
    batch_size: int = option(32, help="Images per training step.")
    augment: str = option("none", choices=AUGMENTS,
                          help="basic: resize, random crop, flip; heavy: rotation 20, flip, RandomResizedCrop, "
                               "affine 20.")
    val_fraction: float = option(0.1, help="Stratified share of train held out for validation.")
    patience: int | None = option(None, help="Early stopping after N epochs without a better val loss.")
    init_head: Path | None = option(None, metavar="RUN", help="A fuse-train run whose head is phase 1.")
    device: str = device_option("Where the model trains.")
    num_workers: int = option(2, help="Processes decoding image files.")
    runs_dir: Path = runs_dir_option("Where run folders are written.")
    resume: bool = option(False, help="Continue an interrupted run of the same command from its last epoch.")
    quiet: bool = quiet_option()
    trust_pickles: bool = option(False, shared=False, help=TRUST_PICKLES)

    def config(self):
        from featcache.finetuning.config import FinetuneConfig
        from featcache.runs.records import resolve_run

        return carried(FinetuneConfig, self, features=self.features(self.device),
                       hidden=tuple(w for w in self.hidden if w),
                       init_head=resolve_run(str(self.init_head), self.runs_dir) if self.init_head else None)
