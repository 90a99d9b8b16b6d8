"""``featcache choose`` against the exhaustive sweep it replaces, side by side on the same caches.

Issue 40's speed point: six small torchvision models (random weights) x every tap and every pair of taps, on
2,000 generated photos (10 classes of striped textures at different angles, noise added; 1,600 train / 400
test), extracted once before either side and timed by neither. Then, in one process:

(a) ``featcache choose`` with its defaults (the screen's four scores and k-NN, then its three rounds, --cv 5),
    in a fresh runs folder, so its screen scores every tap again (the caches are served);
(b) ``featcache sweep --combos pairs --head logreg,knn --cv 5 --keep 0``: every tap and pair, both heads, five
    folds.

Prints both times, their ratio (target: choose at most 1/5 of the sweep), choose's recommendation, and whether
it lies in the sweep's tied set: the sweep's rows whose 5-fold validation accuracy, with its 95% interval over
the folds, reaches the best row's lower bound (the sweep chose nothing on test; neither side reads test to
decide).

    python benchmarks/choose.py                       # 6 models, 2,000 images at 64 px (about 20 min on 2 cores)
    python benchmarks/choose.py --images 400 --models resnet18,mobilenet_v2   # a quick look
    python benchmarks/choose.py --device cuda         # benchmarks/gpu.sh's step
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench_data import stripes

MODELS = "resnet18,mobilenet_v2,mobilenet_v3_small,shufflenet_v2_x0_5,squeezenet1_1,mnasnet0_5"


def main():
    import featcache

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=None, help="folder for data, caches and runs [a temporary one]")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="featcache-choose-"))
    models = args.models.split(",")
    data = work / "photos"
    if not data.exists():
        stripes(data, args.images)
    common = dict(data_dir=data, backbone=models, weights="random", image_size=args.image_size, device=args.device,
                  cache_dir=work / "cache", quiet=True)
    started = time.perf_counter()
    featcache.extract(**common, num_workers=0)
    print(f"extraction (timed by neither side): {time.perf_counter() - started:.1f} s, {len(models)} models, "
          f"{args.images} images at {args.image_size} px")

    started = time.perf_counter()
    choice = featcache.choose(**common, runs_dir=work / f"runs-choose-{time.time_ns()}", num_workers=0)
    choose_s = time.perf_counter() - started
    print(f"(a) choose: {choose_s:.1f} s, {choice.answer['fits']} probe fits")
    for line in choice.lines():
        print("    " + line)

    started = time.perf_counter()
    table = featcache.sweep(**common, combos="pairs", head=["logreg", "knn"], cv=5, keep=0,
                            runs_dir=work / f"runs-sweep-{time.time_ns()}")
    sweep_s = time.perf_counter() - started
    print(f"(b) exhaustive sweep (pairs, logreg + knn, --cv 5): {sweep_s:.1f} s, {len(table)} (combination, head) rows")
    best = table.iloc[table["val_acc"].to_numpy().argmax()]
    floor = best["val_acc"] - best["val_acc_ci"]
    tied = table[table["val_acc"] + table["val_acc_ci"] >= floor]
    r = choice.recommended
    mine = ({t for t in r["taps"]}, r["head"])
    inside = any(({t for t in row.taps.split("+")}, row.head) == mine for row in tied.itertuples())
    print(f"    the sweep's best: {best['taps']} {best['head']} {best['val_acc']:.4f} ± {best['val_acc_ci']:.4f}; "
          f"its tied set: {len(tied)} rows")
    row = table[[({t for t in x.split("+")}, h) == mine for x, h in zip(table["taps"], table["head"])]]
    got = f"{row['val_acc'].iloc[0]:.4f}" if len(row) else "not a row of the sweep"
    print(f"    choose's recommendation {r['candidate']} {r['head']}: the sweep's 5-fold accuracy {got}; "
          f"in the sweep's tied set: {'yes' if inside else 'NO'}")
    print(f"choose / sweep: {choose_s / sweep_s:.3f} (target <= 0.2); sweep / choose: {sweep_s / choose_s:.1f}x")


if __name__ == "__main__":
    main()
