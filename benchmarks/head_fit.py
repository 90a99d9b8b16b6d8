"""Torch head fitting (fuse-train's linear and mlp), side by side in one run on the same features.

(a) before   the candidates (weight decays) one after the other, each with torch's default
             thread count: what fuse-train did until issue 12
(b) after    what fuse-train does now on the CPU: the candidates side by side, one thread each

Both train the same heads (same seeds, same epochs and early stopping) through
``fuse.evaluate.fit_select``. The features are synthetic, shaped like the issue's runs:
1,294 training rows (digits less validation) of 1,836 and of 544 columns, 10 classes.
``--busy N`` starts N processes that spin on the CPU for the whole run, as a test suite or a
second job would on a shared 2-core machine (the issue measured 60.7 s for the mlp there).

    python benchmarks/head_fit.py              # quiet machine
    python benchmarks/head_fit.py --busy 2     # every core also taken by another process
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import numpy as np
import torch
from extract_throughput import cpu_name

from featcache.fuse import evaluate
from featcache.fuse.heads import HEADS, HeadOptions


def features(columns: int, rows: int = 1294, val: int = 144, seed: int = 0):
    """A 10-class problem that takes the whole epoch budget to fit (not separable at once)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, rows + val)
    X = (rng.normal(size=(10, columns))[y] * 0.08 + rng.normal(size=(rows + val, columns))).astype(np.float32)
    return X[:rows], y[:rows], X[rows:], y[rows:]


def spin(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


def timed(head: str, data, concurrent: bool) -> tuple[float, evaluate.Selection]:
    evaluate.CONCURRENT_CPU_FITS = concurrent
    started = time.perf_counter()
    selection = evaluate.fit_select(HEADS[head], HeadOptions(precision="fp32"), *data)
    return time.perf_counter() - started, selection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU during the run")
    parser.add_argument("--columns", default="1836,544")
    parser.add_argument("--heads", default="mlp,linear")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}; torch threads {torch.get_num_threads()}; busy processes {args.busy}")
    spinners = [multiprocessing.Process(target=spin, args=(3600,), daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    try:
        print(f"{'head':<7}{'columns':>8}{'before s':>10}{'after s':>9}{'before/after':>14}  epochs run  val acc before/after")
        for columns in (int(c) for c in args.columns.split(",")):
            data = features(columns)
            for head in args.heads.split(","):
                before, a = timed(head, data, concurrent=False)
                after, b = timed(head, data, concurrent=True)
                same = [c["val_accuracy"] for c in a.candidates] == [c["val_accuracy"] for c in b.candidates]
                epochs = len(b.head.history_["train_loss"])
                print(f"{head:<7}{columns:>8}{before:>10.1f}{after:>9.1f}{before / after:>13.2f}x  {epochs:>10}  "
                      f"{a.val_accuracy:.4f}/{b.val_accuracy:.4f}{'' if same else '  (candidates differ!)'}")
    finally:
        for p in spinners:
            p.terminate()


if __name__ == "__main__":
    main()
