"""Torch head fitting (fuse-train's and the sweep's linear and mlp), its ways side by side on the same features.

(a) one by one   the candidates (weight decays) one after the other, each with torch's default
                 thread count: what fuse-train did until issue 12
(b) threads      the candidates side by side, one thread each: the mlp's way on the CPU
(c) stacked      the candidates as one network with a candidate axis (``fuse.torch_stack``): their way
                 on a GPU
(d) stacked, one thread   the same in one torch thread: the linear head's way on the CPU

All train the same heads (same seeds, same epochs and early stopping) through
``fuse.evaluate.fit_select``. The features are synthetic, shaped like the issue's runs:
1,294 training rows (digits less validation) of 1,836 and of 544 columns, 10 classes.
``--busy N`` starts N processes that spin on the CPU for the whole run, as a test suite or a
second job would on a shared 2-core machine (the issue measured 60.7 s for the mlp there).

    python benchmarks/head_fit.py                    # quiet machine
    python benchmarks/head_fit.py --busy 2           # every core also taken by another process
    python benchmarks/head_fit.py --device cuda      # (a) and (c) on a GPU (threads are the CPU's way only)
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


def timed(head: str, data, way: str, device: str, precision: str) -> tuple[float, evaluate.Selection]:
    evaluate.TORCH_FITS = way  # fit_select sets the one thread of "stacked, one thread" itself
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    selection = evaluate.fit_select(HEADS[head], HeadOptions(precision=precision, device=device), *data)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, selection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU during the run")
    parser.add_argument("--columns", default="1836,544")
    parser.add_argument("--heads", default="mlp,linear")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", help="the torch heads' autocast: fp32, bf16 or fp16 [fp32]")
    args = parser.parse_args()
    ways = ["one by one", "stacked"] if args.device == "cuda" else \
        ["one by one", "threads", "stacked", "stacked, one thread"]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU: {cpu_name()}"
    print(f"{where}; torch threads {torch.get_num_threads()}; busy processes {args.busy}; {args.precision}")
    spinners = [multiprocessing.Process(target=spin, args=(3600,), daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    try:
        small = features(64, rows=64, val=32)
        for head in args.heads.split(","):  # first calls (torch's lazy imports, CUDA context), timed by none
            for way in ways:
                timed(head, small, way, args.device, args.precision)
        names = {"one by one": "(a)", "threads": "(b)", "stacked": "(c)", "stacked, one thread": "(d)"}
        print(f"{'head':<7}{'columns':>8}" + "".join(f"{names[w] + ' s':>8}" for w in ways)
              + "".join(f"{'a/' + names[w][1]:>8}" for w in ways[1:]) + "  epochs  val acc (each way)")
        for columns in (int(c) for c in args.columns.split(",")):
            data = features(columns)
            for head in args.heads.split(","):
                runs = [timed(head, data, way, args.device, args.precision) for way in ways]
                accs = "/".join(f"{s.val_accuracy:.4f}" for _, s in runs)
                chosen = [[c["val_accuracy"] for c in s.candidates] for _, s in runs]
                same = all(c == chosen[0] for c in chosen)
                epochs = len(runs[0][1].head.history_["train_loss"])
                print(f"{head:<7}{columns:>8}" + "".join(f"{t:>8.2f}" for t, _ in runs)
                      + "".join(f"{runs[0][0] / t:>7.2f}x" for t, _ in runs[1:])
                      + f"  {epochs:>6}  {accs}{'' if same else '  (candidates differ!)'}", flush=True)
    finally:
        for p in spinners:
            p.terminate()


if __name__ == "__main__":
    main()
