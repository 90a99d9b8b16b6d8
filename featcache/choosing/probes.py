"""The probes of ``choose``'s rounds: candidates (taps fused side by side), their features, and every grid
point's out-of-fold predictions.

Inside choosing (run -> **probes**), on the sweep's solvers: many candidates' logistic regressions solved
together (:func:`~featcache.solvers.lanes.solve_many`), k-NN by cosine neighbours. Each fold standardises a
tap on its own fit rows, as the sweep does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError

@dataclass(frozen=True)
class Candidate:
    """Taps fused side by side: ((model, tap), ...)."""

    taps: tuple[tuple[str, str], ...]

    @property
    def label(self) -> str:
        return " + ".join(f"{m}:{t}" for m, t in self.taps)

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(m for m, _ in self.taps))


class Features:
    """The taps the probes read, loaded once each from the screen's caches: train rows and labels, test on
    demand."""

    def __init__(self, caches: dict[str, Path]):
        from featcache.extraction.reader import FeatureCache

        self.caches = caches
        self.blocks: dict = {}
        labels = {}
        for model, path in caches.items():
            with FeatureCache(path) as cache:
                labels[model] = (cache.labels("train"), cache.labels("test"), cache.classes, cache.official_val("train"))
        first = next(iter(labels.values()))
        for model, (train, test, classes, _) in labels.items():
            if not (np.array_equal(train, first[0]) and np.array_equal(test, first[1]) and classes == first[2]):
                raise FeatcacheError(f"the caches disagree on the images or labels ({model}'s and "
                                     f"{next(iter(labels))}'s): run featcache choose again with the same data")
        self.y, self.y_test, self.classes, self.official = first

    def train(self, ref: tuple[str, str], keep: bool = True) -> np.ndarray:
        """A tap's training rows, read once and held (``keep``), or read for this use alone."""
        if ref in self.blocks:
            return self.blocks[ref]
        from featcache.extraction.reader import FeatureCache

        with FeatureCache(self.caches[ref[0]]) as cache:
            block = cache.read("train", ref[1]).astype(np.float32)
        if keep:
            self.blocks[ref] = block
        return block

    def test(self, ref: tuple[str, str]) -> np.ndarray:
        from featcache.extraction.reader import FeatureCache

        with FeatureCache(self.caches[ref[0]]) as cache:
            return cache.read("test", ref[1]).astype(np.float32)


def _predictions(candidates: list, head: str, blocks: dict, y_fit, part: str, grid, n_classes: int) -> dict:
    """candidate -> {grid point: predicted classes of the ``part`` rows}, each candidate fitted on the fit rows
    of ``blocks`` ({tap: {"fit" | part: standardised tensor}}): logreg's every C of every candidate in one
    batched solve, k-NN's every k from one search of neighbours."""
    import torch

    from featcache.sweeping.knn import neighbours, vote
    from featcache.solvers.lanes import solve_many
    from featcache.solvers.path import scores_of

    query = {c: torch.cat([blocks[r][part] for r in c.taps], dim=1) for c in candidates}
    if head == "logreg":
        solutions = solve_many([[blocks[r]["fit"] for r in c.taps] for c in candidates], y_fit, list(grid), n_classes)
        return {c: {C: scores_of(query[c], W).argmax(1).cpu().numpy() for C, W in zip(grid, solved)}
                for c, solved in zip(candidates, solutions)}
    out = {}
    for c in candidates:
        fit = torch.cat([blocks[r]["fit"] for r in c.taps], dim=1)
        sims, idx = neighbours(fit, query[c], min(max(grid), len(fit)))
        out[c] = {k: vote(sims, idx, y_fit, min(k, len(fit)), n_classes).argmax(1).cpu().numpy() for k in grid}
    return out


def evaluate(candidates: list[Candidate], heads: list[str], data: Features, folds: list, device, grids: dict,
             keep: bool = True) -> dict:
    """For each (candidate, head): every grid point's predictions on the validation rows of every fold (out of
    fold, so each row once where the folds cover train), the grid point with the best accuracy over those rows
    (the first of equals: the smallest C, the smallest k), its predictions and that accuracy. ``keep``: hold the
    taps read for the later rounds (the screen's k-NN of every tap does not)."""
    import torch

    from featcache.fuse.fusion import standardised_tap

    rows = np.concatenate([val for _, val in folds])
    predicted = {(c, h): {p: np.full(len(data.y), -1) for p in grids[h]} for c in candidates for h in heads}
    refs = list(dict.fromkeys(r for c in candidates for r in c.taps))
    for fit, val in folds:
        blocks = {r: standardised_tap(data.train(r, keep), fit, val, None, device) for r in refs}
        y_fit = torch.as_tensor(data.y[fit], device=device)
        for head in heads:
            for c, by_param in _predictions(candidates, head, blocks, y_fit, "val", grids[head],
                                            len(data.classes)).items():
                for param, classes in by_param.items():
                    predicted[(c, head)][param][val] = classes
    out = {}
    for key, by_param in predicted.items():
        accuracy = {p: float(np.mean(pred[rows] == data.y[rows])) for p, pred in by_param.items()}
        chosen = max(accuracy, key=lambda p: (accuracy[p], -list(accuracy).index(p)))
        out[key] = {"chosen": chosen, "accuracy": accuracy[chosen], "grid": accuracy, "predicted": by_param[chosen]}
    return out


def holdout_knn(ref: tuple[str, str], data: Features, fit_rows, val_rows, device) -> float:
    """One tap's k-NN accuracy (k 10, cosine, temperature-weighted votes) on the held-out share: the screen's
    baseline, read without holding the tap."""
    candidate = Candidate((ref,))
    got = evaluate([candidate], ["knn"], data, [(fit_rows, val_rows)], device, {"knn": (10,)}, keep=False)
    return got[(candidate, "knn")]["accuracy"]


def scored_on_test(entry, chosen, data: Features, device) -> float:
    """The recommendation refitted on every training image with its chosen hyper-parameter and scored on test:
    the one time a test label is read."""
    import torch

    from featcache.fuse.fusion import standardised_tap

    candidate, head = entry
    everything = np.arange(len(data.y))
    blocks = {r: standardised_tap(data.train(r), everything, everything[:0], data.test(r), device)
              for r in candidate.taps}
    y_fit = torch.as_tensor(data.y, device=device)
    [by_param] = _predictions([candidate], head, blocks, y_fit, "test", (chosen,), len(data.classes)).values()
    return float(np.mean(by_param[chosen] == data.y_test))
