"""sweep and rank in one process against ``torchrun --nproc-per-node N``, on the same caches, side by side.

Issue 42's point 3. Generated striped photos (``bench_data.stripes``), random weights (what this machine can
do); the caches are extracted once before either side runs. Each side starts from an empty runs folder, as a
user's command would (``featcache ...`` in a fresh process, so each pays its imports and reads):

- sweep: every tap and pair of taps of the backbones with the heads given; one process with every core's threads
  against N processes with a share each;
- rank: the models given, each extracted and scored (fresh caches each side: the extraction is part of the work).

Printed per command: seconds each way, the ratio (N processes / one), and how far the tables differ (every column
but the seconds, ``fit_s`` and ``images_per_s``): ``equal`` bit for bit, else the largest relative difference of a
number. The sweep's table is compared with a third, untimed run: one process with the ranks' threads (a BLAS
product's rounding can change with its threads); the rank side extracts its own caches, whose float rounding with
fewer threads then differs in the last bits.

    python benchmarks/torchrun_scale.py                                     # the default case, 2 processes
    python benchmarks/torchrun_scale.py --images 600 --rank-models resnet18,mobilenet_v2   # a quick look
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_data import stripes

TIMED = ["fit_s", "images_per_s"]


def run(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": "."}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{' '.join(command[:6])} ... failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def table(folder: Path):
    import pandas as pd

    [path] = [p for p in folder.rglob("table.csv")]
    return pd.read_csv(path).drop(columns=TIMED, errors="ignore")


def difference(a, b) -> str:
    """``equal``, the largest relative difference of the numbers of two tables alike but for them, or ``DIFFER``."""
    import numpy as np

    if a.equals(b):
        return "equal"
    numbers = a.select_dtypes("number").columns
    if list(a.columns) != list(b.columns) or not a.drop(columns=numbers).equals(b.drop(columns=numbers)):
        return "DIFFER"
    x, y = a[numbers].to_numpy(float), b[numbers].to_numpy(float)
    return f"{np.nanmax(np.abs(x - y) / np.maximum(np.abs(x), 1e-12)):.0e}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--backbones", default="resnet18,mobilenet_v2", help="the sweep's caches")
    parser.add_argument("--heads", default="logreg,knn")
    parser.add_argument("--rank-models", default="resnet18,mobilenet_v2,efficientnet_b0,squeezenet1_1")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=None, help="folder for data, caches and runs [a temporary one]")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="featcache-torchrun-"))
    data = work / "photos"
    if not data.exists():
        stripes(data, args.images, noise=90.0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(1, cores // args.processes)
    featcache = [sys.executable, "-m", "featcache"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(args.processes), "-m", "featcache"]
    common = ["--data-dir", str(data), "--weights", "random", "--image-size", str(args.image_size), "--device",
              args.device, "-q"]
    sweep_of = [a for b in args.backbones.split(",") for a in ("--backbone", b)]
    run([*featcache, "extract", *common, *sweep_of, "--cache-dir", str(work / "cache")], cores)
    print(f"{args.images} generated photos at {args.image_size} px, random weights, {cores} cores; "
          f"{args.processes} processes x {share} threads against 1 x {cores}")
    print(f"{'command':<40} {'1 process s':>11} {f'{args.processes} processes s':>14} {'ratio':>6} {'tables':>7}")
    heads = [a for h in args.heads.split(",") for a in ("--head", h)]
    sweep = ["sweep", *common, *sweep_of, *heads, "--keep", "0", "--cache-dir", str(work / "cache")]
    one = run([*featcache, *sweep, "--runs-dir", str(work / "sweep-1")], cores)
    many = run([*torchrun, *sweep, "--runs-dir", str(work / "sweep-n")], share)
    if share != cores:  # the table compared with one process of the ranks' threads (thread counts round differently)
        run([*featcache, *sweep, "--runs-dir", str(work / "sweep-1-alike")], share)
    same = difference(table(work / ("sweep-1-alike" if share != cores else "sweep-1")), table(work / "sweep-n"))
    print(f"{'sweep ' + args.backbones + ' pairs, ' + args.heads:<40} {one:>11.1f} {many:>14.1f} {many / one:>6.2f} "
          f"{same:>7}")
    models = [a for m in args.rank_models.split(",") for a in ("--backbone", m)]
    rank = ["rank", *common, *models, "--score", "logme,hscore", "--num-workers", "0"]
    one = run([*featcache, *rank, "--cache-dir", str(work / "rank-cache-1"), "--runs-dir", str(work / "rank-1")],
              cores)
    many = run([*torchrun, *rank, "--cache-dir", str(work / "rank-cache-n"), "--runs-dir", str(work / "rank-n")],
               share)
    same = difference(table(work / "rank-1"), table(work / "rank-n"))
    print(f"{'rank ' + str(len(models) // 2) + ' models (extract + score)':<40} {one:>11.1f} {many:>14.1f} "
          f"{many / one:>6.2f} {same:>7}")


if __name__ == "__main__":
    main()
