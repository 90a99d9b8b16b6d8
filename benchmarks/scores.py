"""Transferability scores against the sweep's logreg probe on the same features, side by side (issue 31).

(a) CIFAR size: digits tiled to 50,000 training rows (45,000 fit after the validation split), resnet18 +
    mobilenet_v2 late taps at 32 px, 1,792 columns, 10 classes (the features ``sweep.py --large`` builds).
    Timed: the logreg probe with its C grid (fit, choose on validation, score test), and each score --
    LogME, H-score, regularised H-score -- including the Gram of the rows it needs. Target: each score >= 10x
    faster than logreg on the CPU.
(b) Every tap and every pair of resnet50 x mobilenet_v2 (random weights, 64 px) on 1,000 digits: the sweep's
    logreg on every combination (its batched presolve, then each probe) against all the linear scores of every
    combination from one Gram (the sweep's way) -- and NLEEP, which fits a mixture per combination, apart.
    Target: all scores together >= 20x faster than logreg on the same combinations.

    python benchmarks/scores.py                    # both, CPU
    python benchmarks/scores.py --device cuda      # the GPU step of benchmarks/gpu.sh
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
from extract_throughput import cpu_name
from sweep import tiled_digits

from featcache.data.datasets import DataRequest
from featcache.data.preprocess import PreprocessConfig
from featcache.extraction.config import ExtractConfig
from featcache.extraction.run import extract
from featcache.fuse.caches import load_features, locate_caches
from featcache.fuse.evaluate import validation_split
from featcache.fuse.fusion import parse_taps
from featcache.fuse.heads import HeadOptions
from featcache.sweeping.config import all_taps
from featcache.sweeping.probes import presolve, probe
from featcache.sweeping.run import ScoreBlocks, fused_parts, standardised
from featcache.sweeping.moments import moments
from featcache.sweeping.scorers import SCORERS

LINEAR = ("logme", "hscore", "hscore_reg")


def prepared(features: ExtractConfig, taps: str | None, device: str):
    """(taps, their standardised fit / val / test rows, labels, classes); ``taps`` None: every tap."""
    extract(features, progress=False, log=lambda m: None)
    refs = list(parse_taps(taps, features)) if taps else all_taps(features)
    data = load_features(locate_caches(features), set(refs), allow_dead=True, log=lambda m: None)
    fit, val = validation_split(data.labels["train"], 0.1, 0)
    std = standardised(data, fit, val, torch.device(device))
    labels = {"fit": data.labels["train"][fit], "val": data.labels["train"][val], "test": data.labels["test"]}
    y = {part: torch.as_tensor(v, device=device) for part, v in labels.items()}
    return refs, std, y, len(data.classes)


def cifar_size(args, root: Path) -> None:
    features = ExtractConfig(data=tiled_digits(35, limit_train=args.rows, limit_test=args.rows // 5),
                             backbones=("resnet18", "mobilenet_v2"), weights="random",
                             preprocess=PreprocessConfig(image_size=32), dtype="float32", device=args.device,
                             cache_dir=root / "large")
    refs, std, y, n_classes = prepared(features, "late", args.device)
    X = fused_parts(std, refs)
    print(f"(a) {len(X['fit'])} fit rows x {X['fit'].shape[1]} columns, {n_classes} classes", flush=True)
    started = time.perf_counter()
    result = probe("logreg", X, y, n_classes, HeadOptions(device=args.device))
    logreg = time.perf_counter() - started
    print(f"  logreg probe, C grid: {logreg:6.1f} s (val {result['val_acc']:.4f})", flush=True)
    for name in LINEAR:
        started = time.perf_counter()
        value = SCORERS[name].from_moments(moments([std["fit"][r] for r in refs], y["fit"], n_classes))
        seconds = time.perf_counter() - started
        print(f"  {name:<11} {seconds:6.2f} s (Gram included), {logreg / seconds:5.1f}x faster than logreg "
              f"(target >= 10), value {value:.6f}", flush=True)
    import featcache.sweeping.moments as gram_rules

    exact = gram_rules.EXACT_FLOPS
    gram_rules.EXACT_FLOPS = float("inf")  # the same Gram multiplied in float64: what the float32 products cost
    try:
        started = time.perf_counter()
        every = moments([std["fit"][r] for r in refs], y["fit"], n_classes)
        gram64 = time.perf_counter() - started
        print(f"  a float64 Gram took {gram64:.2f} s; the scores from it:", flush=True)
        for name in LINEAR:
            print(f"    {name:<11} {SCORERS[name].from_moments(every):.6f}", flush=True)
    finally:
        gram_rules.EXACT_FLOPS = exact


def every_pair(args, root: Path) -> None:
    features = ExtractConfig(data=DataRequest(name="digits", limit_train=1000, limit_test=300),
                             backbones=("resnet50", "mobilenet_v2"), weights="random",
                             preprocess=PreprocessConfig(image_size=64), dtype="float32", device=args.device,
                             cache_dir=root / "pairs")
    refs, std, y, n_classes = prepared(features, None, args.device)
    combos = [(r,) for r in refs] + list(itertools.combinations(refs, 2))
    print(f"(b) {len(refs)} taps, {len(combos)} combinations (every tap and pair), {len(y['fit'])} fit rows",
          flush=True)
    options = HeadOptions(device=args.device)
    started = time.perf_counter()
    solved = presolve("logreg", [[std["fit"][r] for r in c] for c in combos], y["fit"], n_classes, options)
    for c, (fits, _) in zip(combos, solved):
        probe("logreg", fused_parts(std, list(c)), y, n_classes, options, solved=fits)
    logreg = time.perf_counter() - started
    print(f"  logreg on every combination: {logreg:6.1f} s", flush=True)
    started = time.perf_counter()
    jobs = [{"kind": "score", "head": name, "refs": list(c)} for c in combos for name in LINEAR]
    blocks = ScoreBlocks.of(jobs, std["fit"], y["fit"], n_classes)  # the sweep's way: one Gram (or kernels),
    for c in combos:  # each combination's block decomposed once for its three scores, a few ahead on every core
        block = blocks.take(list(c))
        for name in LINEAR:
            SCORERS[name].from_moments(block)
    scores = time.perf_counter() - started
    print(f"  {', '.join(LINEAR)} on every combination, one Gram: {scores:6.2f} s, {logreg / scores:5.1f}x faster "
          f"than logreg (target >= 20)", flush=True)
    started = time.perf_counter()
    for c in combos[: len(refs)]:
        SCORERS["nleep"].score(fused_parts(std, list(c))["fit"].double().cpu().numpy(), y["fit"].cpu().numpy(),
                               n_classes)
    print(f"  nleep on the {len(refs)} single taps: {time.perf_counter() - started:6.2f} s (a mixture per "
          f"combination: not Gram-based)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=50000, help="training rows of (a)")
    parser.add_argument("--only", choices=("a", "b"), default=None)
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}; device {args.device}; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "a"):
            cifar_size(args, Path(tmp))
        if args.only in (None, "b"):
            every_pair(args, Path(tmp))


if __name__ == "__main__":
    main()
