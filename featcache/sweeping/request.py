"""``SweepRequest``: what ``featcache sweep`` (its API function and pipeline table) asks for.

Inside the sweep (request -> config -> run): the fields, and the one place they become a
:class:`~featcache.sweeping.config.SweepConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featcache.extraction.request import SKIP_BAD_IMAGES, FeatureFields
from featcache.fuse.heads import heads_for, heads_help
from featcache.fuse.request import HeadFields, cv_option
from featcache.requests import carried, device_option, option, quiet_option, runs_dir_option
from featcache.sweeping.config import PAIR_SEARCHES
from featcache.sweeping.scorers import SCORERS, scorers_help


@dataclass(frozen=True)
class SweepRequest(HeadFields, FeatureFields):
    """``featcache sweep``: every tap, pair or combination of the cached taps with every head, at once."""

    combos: str = option("pairs", metavar="singles|pairs|N",
                         help="singles: every tap alone; pairs: every tap and every pair (within and across "
                              "backbones); N: every combination of up to N taps; 0: only the --taps given.")
    taps: tuple[str, ...] = option((), metavar="TAPS",
                                   help="An explicit combination to add, e.g. early,late or "
                                        "resnet50:late,mobilenet_v2:late; repeat for several.")
    head: tuple[str, ...] = option(("logreg", "svm", "linear", "knn"), split=True, metavar="NAME[,NAME]",
                                   choices=lambda: [*heads_for("sweep"), "none"],
                                   help=lambda: "Comma-separated or repeated; none: no probe, the --score "
                                                "scores alone. " + heads_help("sweep"))
    score: tuple[str, ...] = option((), split=True, metavar="NAME[,NAME]", choices=lambda: list(SCORERS),
                                    help=lambda: "Scores that train no head, for every combination (scores.csv): "
                                                 + scorers_help())
    seeds: tuple[int, ...] | None = option(None, metavar="0,1,2",
                                           help="Repeat everything random (validation split, torch heads, few-shot "
                                                "draws) per seed; the table shows the mean and a 95% interval "
                                                "[default: --seed].")
    shots: tuple[int, ...] = option((), metavar="1,5,10",
                                    help="Few-shot: also train on K images per class, --repeats draws each (the heads "
                                         "cheap enough: logreg, svm, knn).")
    repeats: int = option(5, help="Few-shot draws per number of shots.")
    keep: int = option(3, help="Train the best K (combination, head) by validation accuracy as ordinary runs "
                               "(heads that store a model).")
    max_combos: int = option(2000, help="Refuse a search with more combinations than this.")
    pair_search: str = option("all", choices=PAIR_SEARCHES,
                              help="With --combos pairs: all evaluates every pair; promise evaluates every tap "
                                   "alone, then the pairs most promising first (both taps good alone on validation, "
                                   "little alike by linear CKA) and stops after --pair-patience pairs in a row that "
                                   "beat no earlier pair on validation (sweep.json records the order and where it "
                                   "stopped).")
    pair_patience: int = option(10, help="--pair-search promise: stop after this many pairs in a row without a "
                                         "better one.")
    val_fraction: float = option(0.1, help="Stratified share of train that chooses every hyper-parameter.")
    cv: int = cv_option()
    device: str = device_option("Where the probes are solved.")
    runs_dir: Path = runs_dir_option("Where the sweep folder (runs/sweeps/NAME) and kept runs go.")
    extract: bool = option(False, help="Extract missing caches first.")
    skip_bad_images: bool = option(False, help=SKIP_BAD_IMAGES)
    quiet: bool = quiet_option()

    def config(self):
        from featcache.sweeping.config import SweepConfig

        return carried(SweepConfig, self, features=self.features(self.device, skip_bad_images=self.skip_bad_images),
                       heads=() if self.head == ("none",) else self.head, scores=self.score,
                       seeds=self.seeds if self.seeds is not None else (self.seed,),
                       options=self.head_options(self.device, self.precision, self.seed), run_extract=self.extract)


@dataclass(frozen=True)
class SimilarityRequest(FeatureFields):
    """``featcache similarity``: linear CKA between every pair of cached taps, within and across backbones."""

    taps: tuple[str, ...] = option((), metavar="TAPS",
                                   help="The taps to compare, e.g. early,late or resnet50:layer4,mobilenet_v2:late; "
                                        "repeatable [default: every tap of every backbone].")
    debiased: bool = option(False, help="The debiased CKA (unbiased HSIC estimates: for few images).")
    device: str = device_option("Where the caches' backbones would run with --extract.")
    runs_dir: Path = runs_dir_option("Where the matrix goes (runs/similarity/NAME: cka.csv, pairs.csv).")
    extract: bool = option(False, help="Extract missing caches first.")
    skip_bad_images: bool = option(False, help=SKIP_BAD_IMAGES)
    quiet: bool = quiet_option()

    def config(self) -> SimilarityRequest:
        """The request is its runner's input (:func:`featcache.sweeping.similarity.similarity`)."""
        return self
