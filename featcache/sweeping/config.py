"""The sweep's flags as one frozen config, and the tap combinations it evaluates.

Flow: cli -> **config** -> sweep/run. Every check of the request happens here, before any
feature is read: unknown heads, an empty tap list, too many combinations, impossible shots.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from featcache.backbones.spec import LOGITS
from featcache.errors import FeatcacheError, require, unknown
from featcache.extraction.config import ExtractConfig
from featcache.fuse.fusion import TapRef, parse_taps
from featcache.fuse.heads import HeadOptions, heads_for
from featcache.sweeping.scorers import SCORERS

DEFAULT_HEADS = ("logreg", "svm", "linear", "knn")
PAIR_SEARCHES = ("all", "promise")
MAX_COMBOS = 1_000_000  # above any --max-combos: the combinations are listed in memory


@dataclass(frozen=True)
class SweepConfig:
    """Flags of ``featcache sweep``."""

    features: ExtractConfig = field(default_factory=ExtractConfig)
    combos: str = "pairs"  # singles | pairs | N (every combination of up to N taps; 0: only the --taps given)
    taps: tuple[str, ...] = ()  # explicit combinations, each like "early,late"
    heads: tuple[str, ...] = DEFAULT_HEADS
    scores: tuple[str, ...] = ()  # scorers (sweeping.scorers): computed for every combination and seed
    val_fraction: float = 0.1
    cv: int = 0  # --cv K: stratified K-fold cross-validation over train instead of one validation split (0: off)
    seeds: tuple[int, ...] = (0,)
    shots: tuple[int, ...] = ()
    repeats: int = 5
    keep: int = 3
    max_combos: int = 2000
    options: HeadOptions = field(default_factory=HeadOptions)
    runs_dir: Path = Path("runs")
    run_extract: bool = False
    pair_search: str = "all"  # all | promise: pairs in order of promise, stopped after pair_patience without gain
    pair_patience: int = 10

    def __post_init__(self):
        for head in self.heads:
            if head not in heads_for("sweep"):
                raise unknown("--head", head, heads_for("sweep"))
        require(bool(self.heads) or bool(self.scores), "--head", "none" if not self.heads else "''",
                "name at least one head, or come with --score (none: the scores alone)")
        for name in self.scores:
            if SCORERS.lookup(name).reads_logits and not self.features.logits:
                raise FeatcacheError(f"--score {name} reads the source classifier's predictions: add --logits (extract "
                                     f"then stores them as a tap, logits)")
        require(self.combos in ("singles", "pairs") or self.combos.isdigit(),
                "--combos", self.combos, "be singles, pairs or a number of taps N (0: only the --taps given)")
        require(self.combos != "0" or bool(self.taps), "--combos", self.combos, "come with --taps when it is 0")
        require(self.pair_search in PAIR_SEARCHES, "--pair-search", self.pair_search, "be all or promise")
        if self.pair_search == "promise":
            require(self.combos == "pairs", "--combos", self.combos, "be pairs with --pair-search promise")
            require(bool(self.heads), "--head", "none", "name a head with --pair-search promise (its validation "
                                                        "accuracy orders and stops the search)")
        require(self.pair_patience >= 1, "--pair-patience", self.pair_patience, "be at least 1")
        require(0 < self.val_fraction < 1, "--val-fraction", self.val_fraction, "lie between 0 and 1")
        if self.cv:
            from featcache.fuse.train import check_cv_request

            check_cv_request(self.cv)
        require(bool(self.seeds), "--seeds", "''", "list at least one seed")
        require(len(set(self.seeds)) == len(self.seeds), "--seeds", ",".join(map(str, self.seeds)),
                "list each seed once (a repeated seed would count its rows twice)")
        require(all(k >= 1 for k in self.shots), "--shots", self.shots, "be positive numbers of images per class")
        require(self.repeats >= 2 or not self.shots, "--repeats", self.repeats, "be at least 2 (an interval needs two draws)")
        require(self.keep >= 0, "--keep", self.keep, "be 0 or more")
        require(1 <= self.max_combos <= MAX_COMBOS, "--max-combos", self.max_combos,
                f"lie between 1 and {MAX_COMBOS:,} (a table longer than that is read by nobody)")


    def replicates(self) -> list[tuple[int, int | None]]:
        """(seed, fold) of every replicate: each seed's validation split, or with ``cv`` each seed's K folds."""
        return [(seed, fold) for seed in self.seeds for fold in (range(self.cv) if self.cv else [None])]


def logits_taps(cfg: SweepConfig) -> list[TapRef]:
    """Each backbone's ``logits`` tap where a score reads a source classifier (LEEP, NCE): scored alone, never
    fused or probed."""
    if not any(SCORERS.lookup(name).reads_logits for name in cfg.scores):
        return []
    return [TapRef(name, LOGITS) for name in cfg.features.backbones]


def all_taps(features) -> list[TapRef]:
    """Every tap of every backbone of ``features`` (an ExtractConfig), in network order, its ``--module`` taps
    after each backbone's own."""
    return [TapRef(name, tap.node) for name in features.backbones for tap in features.spec(name).taps]


def combinations(cfg: SweepConfig) -> list[tuple[TapRef, ...]]:
    """The tap combinations: the search ``--combos`` asks for, then the explicit ``--taps``, without repeats.

    A count over ``--max-combos`` is refused up front, naming the count and the flag.
    """
    taps = all_taps(cfg.features)
    size = {"singles": 1, "pairs": 2}.get(cfg.combos) or int(cfg.combos)
    count = sum(_n_choose(len(taps), k) for k in range(1, min(size, len(taps)) + 1)) + len(cfg.taps)
    if count > cfg.max_combos:
        raise FeatcacheError(f"--combos {cfg.combos} over {len(taps)} taps makes {count:,} combinations, over "
                             f"--max-combos {cfg.max_combos:,}: choose fewer taps (--combos pairs, or name them with "
                             f"--taps), or raise --max-combos")
    out: list[tuple[TapRef, ...]] = []
    for k in range(1, min(size, len(taps)) + 1):
        out += list(itertools.combinations(taps, k))
    for text in cfg.taps:
        if not text.strip():
            raise FeatcacheError("--taps has an empty entry: name taps such as early,late or resnet50:late")
        refs = parse_taps(text, cfg.features)
        if refs not in out:
            out.append(refs)
    return out


def _n_choose(n: int, k: int) -> int:
    import math

    return math.comb(n, k)


def parse_ints(flag: str, text: str | None) -> tuple[int, ...]:
    """``1,5,10`` -> (1, 5, 10); None or empty -> ()."""
    if not text:
        return ()
    if not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", text):
        raise FeatcacheError(f"{flag} takes comma-separated whole numbers such as 1,5,10. Got {text!r} instead.")
    return tuple(int(v) for v in text.split(","))
