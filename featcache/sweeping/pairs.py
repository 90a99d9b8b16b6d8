"""The pair search by promise: pairs of taps in order of how much fusing them may give, stopped early.

Inside the sweep (config -> run, beside similarity). ``--pair-search promise`` evaluates every single tap first,
then the pairs in order of promise, and stops after ``--pair-patience`` pairs in a row that do not beat the best
pair so far on validation. A pair's promise is the mean of its two taps' validation accuracies alone, discounted
by half their linear CKA (Kornblith et al., ICML 2019): two good taps that say different things first, a tap
beside a near copy of itself last. Every choice reads validation rows only (the singles' validation accuracy,
CKA on the fit rows); the test rows are scored for the pairs evaluated, never consulted.
"""

from __future__ import annotations

import itertools

import numpy as np

CKA_ROWS = 5000  # CKA of a pair on at most this many fit rows (seeded): its estimate is stable long before


def validation_accuracy(rows: list[dict], keys: set[str]) -> dict[tuple[str, ...], float]:
    """taps -> the best head's mean validation accuracy over the replicates, of the probe rows in ``keys``."""
    from featcache.sweeping.tables import row_key

    per: dict[tuple[tuple[str, ...], str], list[float]] = {}
    seen = set()
    for row in rows:
        key = row_key(row)
        if key in seen or key not in keys or row.get("kind") == "score" or row["shots"] or "val_acc" not in row:
            continue
        seen.add(key)
        per.setdefault((tuple(row["taps"]), row["head"]), []).append(float(row["val_acc"]))
    best: dict[tuple[str, ...], float] = {}
    for (taps, _), accs in per.items():
        best[taps] = max(best.get(taps, -1.0), float(np.mean(accs)))
    return best


def pair_cka(train: dict, fit_rows: np.ndarray, refs: list, seed: int = 0,
             most: int | None = CKA_ROWS) -> dict[tuple, float]:
    """Linear CKA of every pair of ``refs`` (``train``: ref -> its training rows) on at most ``most`` of the fit
    rows (seeded; None: all of them, as ``choose`` reads its survivors), each tap standardised as the probes see it:
    how much the two say the same thing (1: the same up to a rotation and scale; near 0: unrelated)."""
    from featcache.fuse.fusion import TapNormalizer
    from featcache.sweeping.similarity import cka_matrix

    rows = np.asarray(fit_rows)
    if most is not None and len(rows) > most:
        rows = np.sort(np.random.default_rng(seed).choice(rows, most, replace=False))
    blocks = [TapNormalizer("standard").fit_transform([np.asarray(train[r][rows], dtype=np.float32)]) for r in refs]
    matrix = cka_matrix(blocks)
    return {(a, b): float(matrix[i, j]) for (i, a), (j, b) in itertools.combinations(enumerate(refs), 2)}


def promise_order(pairs: list[tuple], alone: dict[str, float], cka: dict[tuple, float]) -> list[tuple]:
    """``pairs`` most promising first: mean accuracy alone x (1 - CKA / 2); ties in network order."""
    def promise(pair):
        a, b = pair
        similar = cka.get((a, b), cka.get((b, a), 0.0))
        similar = 0.0 if not np.isfinite(similar) else similar
        return (alone.get(str(a), 0.0) + alone.get(str(b), 0.0)) / 2 * (1 - similar / 2)  # no row alone: last

    return sorted(pairs, key=promise, reverse=True)  # stable: network order among equals


class Stopper:
    """The early stop: after ``patience`` pairs in a row, in the order evaluated, none of which beats the best
    pair's validation accuracy so far."""

    def __init__(self, patience: int):
        self.patience, self.best, self.since = patience, -1.0, 0

    def add(self, accuracy: float) -> bool:
        """Take the next pair's validation accuracy; True when the search stops here."""
        if accuracy > self.best:
            self.best, self.since = accuracy, 0
        else:
            self.since += 1
        return self.since >= self.patience


def summary(order: list[tuple], evaluated: int, stopped: bool, patience: int) -> dict:
    """What sweep.json records of the search: the order and how far it went."""
    return {"pair_search": {"order": [[str(a), str(b)] for a, b in order], "evaluated": evaluated,
                            "of": len(order), "stopped_early": stopped, "patience": patience}}


def line(info: dict) -> str:
    """The closing line the sweep prints."""
    s = info["pair_search"]
    how = (f"stopped after {s['patience']} pairs in a row without a better one" if s["stopped_early"]
           else "every pair")
    return f"pair search by promise: {s['evaluated']} of {s['of']} pairs evaluated ({how})"

