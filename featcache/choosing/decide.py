"""The decision from paired predictions: P(best), the tied set, the fast choice, chance, and how far to trust a
screen's scores.

Inside choosing (run -> **decide**), numbers only: nothing here reads a cache or trains. ``correct`` is a
(candidates, rows) boolean matrix, every candidate predicted on the same rows (out of fold with ``--cv``), so
every comparison is paired.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
ALPHA = 0.05
TAU_FLOOR = 0.3  # a score whose Kendall tau against the probes is under this is not informative here


def p_best(correct: np.ndarray, resamples: int = RESAMPLES, seed: int = 0, chunk: int = 100) -> tuple[np.ndarray,
                                                                                                        np.ndarray]:
    """(P(best) per candidate, the bootstrap accuracies (candidates, resamples)): rows drawn with replacement, the
    same draw for every candidate; P(best) is the share of draws in which no candidate beats it. Candidates tied
    at the top of a draw each count it, so the shares need not sum to one: two candidates that predict alike
    are both "the best" as often as either."""
    rng = np.random.default_rng(seed)
    k, n = correct.shape
    scores = np.empty((k, resamples))
    as_float = correct.astype(np.float32)
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(m)]).astype(np.float32)
        scores[:, start:start + m] = as_float @ counts.T / n
    best = scores.max(axis=0, keepdims=True)
    winners = np.isclose(scores, best, rtol=0, atol=1e-12)
    return winners.mean(axis=1), scores


def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    """Exact McNemar p-value (two-sided) of two classifiers' paired correctness: the binomial test of the rows one
    gets right and the other wrong. 1 where they never disagree."""
    from scipy.stats import binomtest

    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue)


def beats_chance(correct_row: np.ndarray, chance: float, compared: int) -> tuple[bool, float]:
    """Whether a candidate's accuracy beats always answering the commonest class, by a one-sided binomial test
    Bonferroni-corrected for the ``compared`` candidates it was picked from; (verdict, corrected p)."""
    from scipy.stats import binomtest

    p = binomtest(int(correct_row.sum()), len(correct_row), min(max(chance, 1e-12), 1 - 1e-12),
                  alternative="greater").pvalue
    p = min(1.0, float(p) * max(compared, 1))
    return p < ALPHA, p


@dataclass(frozen=True)
class Verdict:
    """The decision over the final round's candidates (indices into them)."""

    recommended: int
    accuracy: np.ndarray  # (candidates,)
    p_best: np.ndarray  # (candidates,)
    interval: tuple[float, float]  # the recommended's 95% bootstrap interval
    tied: list[int]  # the recommended first
    p_values: np.ndarray  # McNemar against the recommended (1 for itself)
    fast: int
    beats_chance: bool
    chance: float
    chance_p: float


def decide(correct: np.ndarray, speed: np.ndarray, params: np.ndarray, chance: float, seed: int = 0) -> Verdict:
    """The recommendation: the best out-of-fold accuracy (equals: the larger P(best), then the faster); the tied
    set: every candidate the paired McNemar test cannot separate from it (p >= 0.05); the fast choice: the tied
    candidate with the most images per second (equals: fewer parameters, then the more accurate)."""
    accuracy = correct.mean(axis=1)
    probability, boot = p_best(correct, seed=seed)
    speed = np.nan_to_num(np.asarray(speed, dtype=float), nan=0.0)
    params = np.nan_to_num(np.asarray(params, dtype=float), nan=np.inf)
    order = sorted(range(len(accuracy)), key=lambda i: (-accuracy[i], -probability[i], -speed[i], params[i]))
    best = order[0]
    p_values = np.array([1.0 if i == best else mcnemar(correct[best], correct[i]) for i in range(len(accuracy))])
    tied = [i for i in order if p_values[i] >= ALPHA]
    fast = min(tied, key=lambda i: (-speed[i], params[i], -accuracy[i]))
    low, high = np.percentile(boot[best], [2.5, 97.5])
    verdict, p = beats_chance(correct[best], chance, len(accuracy))
    return Verdict(best, accuracy, probability, (float(low), float(high)), tied, p_values, fast, verdict, chance, p)


def trust(values: dict[str, np.ndarray], accuracy: np.ndarray, scores: set[str],
          tolerance: float = 1e-6) -> list[dict]:
    """How far each screen value orders the confirmed taps as the probe does: Kendall's tau-b against the probe's
    accuracy, and the regret (the accuracy lost picking the tap it ranks first; its tied firsts averaged). A
    "random order" row gives a random pick's expected regret. A score (in ``scores``) is "not informative on
    this data" when it cannot tell the taps apart, its tau is under 0.3, or its regret exceeds a baseline's."""
    from scipy.stats import kendalltau

    from featcache.sweeping.scorers import separates

    best = float(np.max(accuracy))
    rows = []
    for name, vals in values.items():
        vals = np.asarray(vals, dtype=float)
        have = np.isfinite(vals)
        if have.sum() < 2:
            continue
        v, a = vals[have], accuracy[have]
        tau = float(kendalltau(v, a).statistic) if separates(v, tolerance) and np.ptp(a) > 0 else float("nan")
        first = np.isclose(v, v.max(), rtol=0, atol=tolerance)
        rows.append({"name": name, "kind": "score" if name in scores else "baseline", "kendall_tau": tau,
                     "regret": best - float(a[first].mean()), "taps": int(have.sum()),
                     "separates": bool(separates(v, tolerance))})
    rows.append({"name": "random order", "kind": "baseline", "kendall_tau": 0.0, "regret": best - float(np.mean(accuracy)),
                 "taps": len(accuracy), "separates": True})
    floor = min(r["regret"] for r in rows if r["kind"] == "baseline")
    for r in rows:
        reasons = []
        if not r["separates"]:
            reasons.append("cannot tell the taps apart (every value within 1e-6)")
        elif not np.isfinite(r["kendall_tau"]) or r["kendall_tau"] < TAU_FLOOR:
            reasons.append(f"tau {r['kendall_tau']:+.2f} under {TAU_FLOOR}")
        if r["kind"] == "score" and r["regret"] > floor + 1e-12:
            reasons.append(f"regret {100 * r['regret']:.1f} points above a baseline's {100 * floor:.1f}")
        r["informative"] = not reasons if r["kind"] == "score" else None
        r["why"] = "; ".join(reasons)
    return rows
