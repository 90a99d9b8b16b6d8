"""``--cv K`` on small data: the sweep's batched solvers serve the folds as they serve seeds.

Issue 32's figure. A student's 160 images (digits, 10 classes) through resnet18 and mobilenet_v2 (random weights,
64 px), every tap and pair, heads logreg, svm and knn, timed three ways in one run on the same cache:

  (a) ``featcache sweep --cv 5``: five folds, each solved as a seed is (every combination's C at once);
  (b) ``featcache sweep --seeds 0,1,2,3,4``: five validation splits, what --cv replaces;
  (c) the notebook way for the logreg alone: scikit-learn's ``GridSearchCV(StandardScaler + LogisticRegression,
      cv=StratifiedKFold(5))`` per combination, the same C grid.

Prints each time, a/b (the folds cost what seeds cost: about 1) and c/a's logreg share, and whether (a) and (c)
chose the same C for every combination.

    python benchmarks/cv.py                       # 160 training images (about 3 minutes on 2 cores)
    python benchmarks/cv.py --train 400 --combos singles
    python benchmarks/cv.py --device cuda     # the cv step of benchmarks/gpu.sh
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from featcache.data.preprocess import PreprocessConfig
from featcache.data.source import DataRequest
from featcache.extraction.config import ExtractConfig
from featcache.extraction.run import extract
from featcache.fuse.caches import load_features, locate_caches
from featcache.fuse.heads import C_GRID
from featcache.sweeping.config import SweepConfig, all_taps, combinations
from featcache.sweeping.run import sweep


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="resnet18,mobilenet_v2")
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--combos", default="pairs")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="where the network and the sweep's probes run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        features = ExtractConfig(data=DataRequest(name="digits", limit_train=args.train, limit_test=args.test),
                                 backbones=tuple(args.backbones.split(",")), weights="random",
                                 preprocess=PreprocessConfig(image_size=args.image_size), device=args.device,
                                 cache_dir=Path(tmp) / "cache")
        extract(features, log=lambda m: None)
        from featcache.fuse.heads import HeadOptions

        base = dict(features=features, combos=args.combos, heads=("logreg", "svm", "knn"), keep=0,
                    options=HeadOptions(device=args.device))
        n = len(combinations(SweepConfig(**base)))
        print(f"{n} combinations of {args.backbones} taps x logreg, svm, knn on {args.train} digits at "
              f"{args.image_size} px, {args.folds} folds", flush=True)
        timed = {}
        for name, kw in (("a", {"cv": args.folds}), ("b", {"seeds": tuple(range(args.folds))})):
            start = time.perf_counter()
            folder = sweep(SweepConfig(**base, **kw, runs_dir=Path(tmp) / name), log=lambda m: None)
            timed[name] = (time.perf_counter() - start, folder)
        import pandas as pd

        table = pd.read_csv(timed["a"][1] / "table.csv")
        logreg_s = sum(r["fit_s"] for r in map(json.loads, (timed["a"][1] / "rows.jsonl").read_text().splitlines())
                       if r["head"] == "logreg")
        print(f"(a) sweep --cv {args.folds}: {timed['a'][0]:.1f} s (logreg's share {logreg_s:.1f} s)")
        print(f"(b) sweep --seeds 0..{args.folds - 1}: {timed['b'][0]:.1f} s")
        print(f"a/b = {timed['a'][0] / timed['b'][0]:.2f} (folds served as seeds are: about 1)")
        start = time.perf_counter()
        chosen = grid_search(features, SweepConfig(**base), args.folds)
        notebook = time.perf_counter() - start
        print(f"(c) GridSearchCV per combination, logreg: {notebook:.1f} s; c / a's logreg = {notebook / logreg_s:.1f}x")
        ours = {row.taps: json.loads(row.chosen)["C"] for row in table[table["head"] == "logreg"].itertuples()}
        same = sum(ours[taps] == c for taps, (c, _) in chosen.items())
        means = _fold_means(timed["a"][1])
        gaps = [abs(means[taps][k] - theirs[k]) for taps, (_, theirs) in chosen.items() for k in range(len(C_GRID))]
        fold = args.train / args.folds
        print(f"the same C chosen by (a) and (c) for {same} of {len(chosen)} combinations; each C's mean accuracy over "
              f"the folds differs by {np.mean(gaps):.4f} on average, at most {max(gaps):.4f} (one image of a fold: "
              f"{1 / fold:.4f}): the solvers stop at slightly different weights, and on so few images one prediction "
              f"moves a mean past a tie")


def _fold_means(folder: Path) -> dict:
    """taps -> the logreg's mean validation accuracy over the folds, per C in C_GRID's order (from rows.jsonl)."""
    rows = [r for r in map(json.loads, (folder / "rows.jsonl").read_text().splitlines()) if r["head"] == "logreg"]
    out: dict = {}
    for r in rows:
        out.setdefault("+".join(r["taps"]), []).append([val for _, val, *_ in r["candidates"]])
    return {taps: np.mean(accs, axis=0) for taps, accs in out.items()}


def grid_search(features, cfg, folds: int) -> dict:
    """taps -> (the C scikit-learn's GridSearchCV chooses on the same folds (seed 0), each C's mean accuracy)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = load_features(locate_caches(features), set(all_taps(features.backbones)), allow_dead=True)
    y = data.labels["train"]
    out = {}
    for refs in combinations(cfg):
        X = np.hstack([data.taps[("train", r)] for r in refs])
        search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
                              {"logisticregression__C": list(C_GRID)},
                              cv=StratifiedKFold(folds, shuffle=True, random_state=0))
        search.fit(X, y)
        out["+".join(map(str, refs))] = (search.best_params_["logisticregression__C"],
                                          search.cv_results_["mean_test_score"])
    return out


if __name__ == "__main__":
    main()
