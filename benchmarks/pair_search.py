"""The pair search by promise against trying every pair, on the same caches, per backbone pair.

Issue 43's point 7. For each backbone pair (default: resnet50 x mobilenet_v2 and three more), every tap and
every pair of taps is swept exhaustively with the heads given (``--combos pairs``, validation only decides), then
the same sweep with ``--pair-search promise`` (it reuses the exhaustive rows: the same folder) records its order
of the pairs and where its early stop (``--pair-patience``) ends. Printed per backbone pair:

- pairs: how many there are;
- best: the exhaustive sweep's best pair by validation accuracy (the best head), and its tied set (every pair
  whose validation accuracy equals it: what validation cannot tell apart);
- to best / to tied: how many pairs of the promise order it takes to reach the best pair's accuracy, and the
  first pair of its tied set;
- stopped at: where the early stop ended, and whether the pairs evaluated by then hold the best accuracy;
- time: the exhaustive sweep against the promise search (each from an empty sweep folder, caches served).

Nothing here reads test accuracy. Offline it runs on generated striped photos (noise 90: the taps and pairs
differ) with random weights (what this machine can do); ``--weights imagenet`` where the weights are cached (benchmarks/gpu.sh's step).

    python benchmarks/pair_search.py                                     # 4 backbone pairs, 1,200 images, 64 px
    python benchmarks/pair_search.py --pairs resnet18+mobilenet_v2 --images 400   # a quick look
    python benchmarks/pair_search.py --weights imagenet --device cuda    # the GPU step
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_data import stripes

PAIRS = "resnet50+mobilenet_v2,resnet18+mobilenet_v2,vgg16+mobilenet_v2,resnet18+efficientnet_b0"


def main():
    import featcache
    from featcache.solvers.lanes import _SOLVED

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default=PAIRS)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--head", default="logreg")
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=None, help="folder for data, caches and runs [a temporary one]")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="featcache-pairs-"))
    data = work / "photos"
    if not data.exists():
        stripes(data, args.images, noise=90.0)  # noisy enough that taps and pairs differ (40: most reach 100%)
    print(f"{args.images} generated photos at {args.image_size} px, {args.weights} weights, head {args.head}, "
          f"--pair-patience {args.patience}")
    print(f"{'backbones':<28} {'pairs':>5} {'best':>7} {'tied':>5} {'to best':>8} {'to tied':>8} "
          f"{'stopped at':>10} {'best by then':>12} {'all s':>7} {'promise s':>9}")
    for pair in args.pairs.split(","):
        backbones = pair.split("+")
        common = dict(data_dir=data, backbone=backbones, weights=args.weights, image_size=args.image_size,
                      device=args.device, cache_dir=work / "cache", quiet=True, head=args.head.split(","), keep=0,
                      combos="pairs")
        featcache.extract(**{k: v for k, v in common.items() if k not in ("head", "keep", "combos")}, num_workers=0)
        _SOLVED.clear()  # each side solves from scratch (the solvers keep solutions within a process)
        started = time.perf_counter()
        table = featcache.sweep(**common, runs_dir=work / f"runs-all-{pair}")
        all_s = time.perf_counter() - started
        _SOLVED.clear()
        started = time.perf_counter()
        featcache.sweep(**common, pair_search="promise", pair_patience=args.patience, runs_dir=work / f"runs-p-{pair}")
        promise_s = time.perf_counter() - started
        folder = work / f"runs-p-{pair}" / "sweeps" / Path(table.attrs["folder"]).name  # the same request's name
        search = json.loads((folder / "sweep.json").read_text())["pair_search"]
        pairs = table[table["n_taps"] == 2]
        by_pair = pairs.groupby("taps")["val_acc"].max()
        best = by_pair.max()
        tied = set(by_pair[by_pair == best].index)
        order = ["+".join(p) for p in search["order"]]
        accs = [by_pair.get(p, by_pair.get("+".join(reversed(p.split("+"))), float("nan"))) for p in order]
        to_best = next(i + 1 for i, a in enumerate(accs) if a >= best)
        to_tied = next(i + 1 for i, p in enumerate(order) if p in tied or "+".join(reversed(p.split("+"))) in tied)
        stop = search["evaluated"]
        reached = max(accs[:stop]) >= best
        print(f"{pair:<28} {len(order):>5} {best:>7.4f} {len(tied):>5} {to_best:>8} {to_tied:>8} {stop:>10} "
              f"{'yes' if reached else 'no':>12} {all_s:>7.1f} {promise_s:>9.1f}")


if __name__ == "__main__":
    main()
