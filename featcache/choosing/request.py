"""``ChooseRequest``: what ``featcache choose`` (its API function and ``[[choose]]`` table) asks for.

Inside choosing (request -> run): the fields; :meth:`ChooseRequest.rank_request` is the screen's ranking,
made by the one rule (:func:`featcache.requests.carried`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from featcache.errors import FeatcacheError
from featcache.ranking.request import RankRequest, ZooFields
from featcache.requests import FRACTION, carried, option, runs_dir_option
from featcache.sweeping.scorers import SCORERS, scorers_help

def _budget_rule(value: str) -> bool:
    return value == "auto" or re.fullmatch(r"[1-9][0-9]*", value) is not None or (
        re.fullmatch(r"[0-9]+(\.[0-9]+)?[sm]", value) is not None and float(value[:-1]) > 0)


def parse_budget(value: str) -> tuple[int | None, float | None]:
    """``--budget`` as (probe fits, seconds): 60 -> (60, None); 90s / 1.5m -> (None, 90.0); auto -> (None, None),
    the funnel's full rounds."""
    if value == "auto":
        return None, None
    if value[-1] in "sm":
        return None, float(value[:-1]) * (60 if value[-1] == "m" else 1)
    return int(value), None


@dataclass(frozen=True)
class ChooseRequest(ZooFields):
    """``featcache choose``: one recommendation -- backbone(s), taps, head -- with P(best), the tied set, the fast
    choice and how far each score can be trusted on this data."""

    score: tuple[str, ...] = option(("logme", "sfda", "ncti", "etran"), split=True, metavar="NAME[,NAME]",
                                    choices=lambda: [n for n in SCORERS if not SCORERS[n].reads_logits],
                                    help=lambda: "The screen's scores of every tap (each one's top taps go on to the "
                                                 "probes; each is checked against them): " + scorers_help())
    budget: str = option("auto", check=_budget_rule, rule="be auto, a number of probe fits (60) or seconds (90s, "
                                                           "2m)", metavar="auto|FITS|SECONDS",
                         help="What the probes may spend after the screen: probe fits (one head on one fold of one "
                              "candidate, its whole grid) or seconds (90s, 2m) [auto: the funnel's full rounds: up "
                              "to 40 taps probed, the best 4 and their 6 pairs confirmed, 8 finalists decided].")
    cv: int = option(5, check=lambda v: v >= 2, rule="be at least 2",
                     help="Folds of the deciding round: every training image is predicted once, out of fold, and "
                          "P(best) and the tied set come from those paired predictions.")
    singles: bool = option(False, help="Confirm the surviving taps alone: no fused pairs of them.")
    val_fraction: float = option(0.2, help="Stratified share of train the screen's k-NN and the first round's "
                                           "probes are scored on (the scores use the rest).", **FRACTION)
    runs_dir: Path = runs_dir_option("Where the choice's folder goes (runs/choices/NAME: answer.json, "
                                     "candidates.csv, trust.csv), beside the screen's ranking (runs/ranks/).")

    def config(self) -> ChooseRequest:
        """The request, checked before anything is built or extracted."""
        self.zoo_checks("choose")
        fits, _ = parse_budget(self.budget)
        if fits is not None and fits < minimum_fits(self.cv):
            raise FeatcacheError(f"--budget {self.budget} is too small for one round of the funnel: it needs at least "
                                 f"{minimum_fits(self.cv)} probe fits with --cv {self.cv}")
        return self

    def rank_request(self) -> RankRequest:
        """The screen: every tap of every model scored, the caches kept for the probes."""
        return carried(RankRequest, self, keep_caches="all", confirm=0)


def minimum_fits(cv: int) -> int:
    """The fewest fits the funnel can decide with: two taps probed once, two candidates x two heads x three folds,
    then two x ``cv`` folds."""
    return 2 + 2 * 2 * 3 + 2 * cv
