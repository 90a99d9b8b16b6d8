"""``RankRequest``: what ``featcache rank`` (its API function and pipeline table) asks for.

Inside ranking (request -> run): the fields; :func:`featcache.ranking.run.rank` does the work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from featcache.errors import FeatcacheError
from featcache.extraction.request import SKIP_BAD_IMAGES, FeatureFields
from featcache.requests import FRACTION, at_least, device_option, option, quiet_option, runs_dir_option
from featcache.sweeping.scorers import SCORERS, scorers_help


def _size_rule(value: str) -> bool:
    return re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*", value) is not None


def _keep_rule(value: str) -> bool:
    return value in ("all", "none") or re.fullmatch(r"top-[1-9][0-9]*", value) is not None


@dataclass(frozen=True)
class ZooFields(FeatureFields):
    """Many models by name or pattern, extracted a few at a time: what ``rank`` and ``choose`` share."""

    backbone: tuple[str, ...] = option((), metavar="PATTERN",
                                       help="Backbone names or glob patterns, repeatable: 'resnet*' (torchvision "
                                            "and declared), 'timm:convnext*' (timm); featcache backbones --all "
                                            "PATTERN lists what a pattern matches.")
    pretrained_only: bool = option(False, help="Keep only the models that have weights to load (timm's pretrained "
                                               "list, torchvision's weights enums).")
    max_models: int = option(50, **at_least(1),
                             help="Refuse a larger match up front (the count is said).")
    models_at_once: int = option(4, **at_least(1),
                                 help="Models extracted in one shared pass over the data (each image decoded once "
                                      "for all of them).")
    device: str = device_option("Where the backbones run and the scores and probes are computed.")
    batch_size: int = option(64, **at_least(1), help="Images per forward pass.")
    num_workers: int | None = option(None, **at_least(0),
                                     help="Processes decoding image files.")
    skip_bad_images: bool = option(False, help=SKIP_BAD_IMAGES)
    memory: str | None = option(None, metavar="SIZE", check=_size_rule, rule="be a size such as 4G or 500M",
                                help="At most about this much memory for one tap's rows while scoring it (4G, 500M); "
                                     "a tap whose rows need more is read from its cache in chunks, to the same "
                                     "scores (LogME and the H-scores) [default: half the memory available].")
    quiet: bool = quiet_option()

    def zoo_checks(self, command: str) -> None:
        if not self.score:
            raise FeatcacheError(f"--score needs at least one score: {', '.join(SCORERS)}")
        if not self.backbone:
            raise FeatcacheError(f"featcache {command} needs --backbone: names or patterns such as 'resnet*' or "
                                 f"'timm:convnext*'")


@dataclass(frozen=True)
class RankRequest(ZooFields):
    """``featcache rank``: score every tap of many backbones with transferability scores, training nothing."""

    score: tuple[str, ...] = option(("logme", "hscore"), split=True, metavar="NAME[,NAME]",
                                    choices=lambda: list(SCORERS),
                                    help=lambda: "Scores of every tap (the first orders the table): " + scorers_help())
    keep_caches: str = option("all", check=_keep_rule, rule="be all, none or top-K (e.g. top-3)",
                              metavar="all|none|top-K",
                              help="Which caches the ranking leaves behind: all, none, or those of the best K "
                                   "models by the first score (caches that existed before are always kept).")
    confirm: int = option(0, **at_least(0), metavar="K",
                          help="Check the scores on this data: train the batched logreg probe and k-NN on the top K "
                               "taps by each score, and give each score's Kendall tau against the probe's "
                               "validation accuracy (featcache choose does this and decides).")
    val_fraction: float = option(0.1, help="Stratified share of train held out: the scores use the rest, the "
                                           "--confirm probes choose on it.", **FRACTION)
    runs_dir: Path = runs_dir_option("Where the ranking's folder goes (runs/ranks/NAME: rows.jsonl, table.csv).")

    def config(self) -> RankRequest:
        """The request, checked before anything is built or extracted (a pipeline's [[rank]] table is checked
        when the file is read)."""
        self.zoo_checks("rank")
        return self
