"""An ImageNet-shaped cache, and the scores of its taps with their rows in memory against streamed under --memory.

Issue 42's point 4. ``write`` makes, through featcache's own store (``CacheWriter``), a cache with resnet50's four
tap widths (256, 512, 1,024, 2,048), the requested train / test rows and classes, and planted class structure:
each class has a mean in a 32-dimensional subspace of every tap, stronger the deeper the tap (so the scores order
the taps layer1 < ... < layer4, far from chance), plus unit noise; float16, as extraction stores it. Its
fingerprint says ``synthetic`` (weights and dataset), so nothing mistakes it for resnet50's features.

Then, for each size of the series, each tap is scored (LogME and the H-score, rank's own ``score_tap``) twice, each
in a fresh process: with its rows in memory, and under ``--memory`` (default 512M: every tap whose rows need more is streamed from the cache).
Printed per (rows, way): seconds, seconds per 1,000 rows (flat when the time is linear in the rows), the process's
peak RSS, and the largest relative difference of a score from the in-memory one. A size whose in-memory rows would
exceed ``--in-memory-up-to`` is run streamed only.

    python benchmarks/imagenet_shaped.py                                          # 80k..640k rows, 100 classes
    python benchmarks/imagenet_shaped.py --series 1281167 --test-rows 50000 --classes 1000 --in-memory-up-to 0
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TAPS = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}  # resnet50's
SIGNAL = {"layer1": 0.05, "layer2": 0.1, "layer3": 0.2, "layer4": 0.4}  # a class mean's scale per subspace axis
RANK = 32  # the planted means' subspace
SCORES = ["logme", "hscore"]
CHUNK = 16384


def write(path: Path, n_train: int, n_test: int, classes: int, seed: int = 0) -> Path:
    """The synthetic cache at ``path`` (written once: an existing file is reused)."""
    from featcache.extraction.store import CacheWriter

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    means = {t: (rng.normal(0, 1, (classes, RANK)) @ rng.normal(0, 1, (RANK, d)) * SIGNAL[t] / np.sqrt(RANK))
             .astype(np.float32) for t, d in TAPS.items()}
    labels = {"train": rng.integers(0, classes, n_train), "test": rng.integers(0, classes, n_test)}
    fingerprint = {"format": "synthetic", "backbone": "resnet50-shaped", "taps": [[t, d] for t, d in TAPS.items()],
                   "weights": "synthetic: planted class means, no network", "dtype": "float16",
                   "dataset": {"synthetic": "imagenet-shaped", "train": n_train, "test": n_test, "classes": classes,
                               "seed": seed, "signal": SIGNAL, "rank": RANK}}
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = CacheWriter(path, fingerprint, {s: (y, np.arange(len(y))) for s, y in labels.items()}, TAPS, "float16",
                         [f"class{c}" for c in range(classes)], {})
    for split, y in labels.items():
        for start in range(0, len(y), CHUNK):
            rows = y[start:start + CHUNK]
            writer.write(split, start, {t: (means[t][rows] + rng.standard_normal((len(rows), d), np.float32))
                                        .astype(np.float16) for t, d in TAPS.items()})
    writer.finish()
    return path


def score(path: Path, memory: str | None) -> dict:
    """Every tap's scores, in this process: rank's own scoring on the fit rows it would use."""
    from featcache.extraction.reader import FeatureCache
    from featcache.fuse.evaluate import validation_split
    from featcache.ranking.run import score_tap

    started = time.perf_counter()
    out = {}
    with FeatureCache(path) as cache:
        labels = cache.labels("train")
        fit_rows, _ = validation_split(labels, 0.1, 0, None)
        for tap in TAPS:
            values, _ = score_tap(cache, "resnet50-shaped", tap, fit_rows, labels[fit_rows], len(cache.classes),
                                  SCORES, memory)
            out[tap] = values
    return {"scores": out, "seconds": time.perf_counter() - started,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", default="80000,160000,320000,640000", help="training rows, comma-separated")
    parser.add_argument("--test-rows", type=int, default=10000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--memory", default="512M", help="the streamed side's --memory (a tap whose fit rows need "
                                                             "more, at 12 bytes a value, is streamed)")
    parser.add_argument("--in-memory-up-to", type=float, default=8.0,
                        help="GB of rows in memory (12 bytes a value) above which a size runs streamed only")
    parser.add_argument("--work", type=Path, default=None, help="where the caches go [a temporary folder]")
    parser.add_argument("--one", nargs=2, metavar=("CACHE", "MEMORY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child: one way of one size
        print(json.dumps(score(Path(args.one[0]), None if args.one[1] == "none" else args.one[1])))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="featcache-imagenet-shaped-"))
    from extract_throughput import cpu_name

    cpu = cpu_name()
    print(f"ImageNet-shaped caches: resnet50's taps ({', '.join(f'{t} {d}' for t, d in TAPS.items())}), "
          f"{args.classes} classes, float16; {cpu}; scores {', '.join(SCORES)}")
    print(f"{'train rows':>10} {'way':<14} {'write s':>8} {'score s':>8} {'s / 1k rows':>11} {'peak RSS GB':>11} "
          f"{'max rel diff':>12}  best tap")
    for rows in map(int, args.series.split(",")):
        started = time.perf_counter()
        path = write(work / f"rows{rows}.h5", rows, args.test_rows, args.classes)
        written = time.perf_counter() - started
        in_memory = rows * 0.9 * max(TAPS.values()) * 12 / 1e9 <= args.in_memory_up_to
        ways = ([("in memory", "none")] if in_memory else []) + [(f"--memory {args.memory}", args.memory)]
        reference = None
        for way, memory in ways:
            done = subprocess.run([sys.executable, __file__, "--one", str(path), memory], capture_output=True,
                                  text=True)
            if done.returncode:
                sys.exit(done.stderr[-3000:])
            got = json.loads(done.stdout.strip().splitlines()[-1])
            values = np.array([got["scores"][t][s] for t in TAPS for s in SCORES])
            reference = values if reference is None else reference
            diff = float(np.max(np.abs(values - reference) / np.maximum(np.abs(reference), 1e-12)))
            best = max(TAPS, key=lambda t: got["scores"][t]["logme"])
            print(f"{rows:>10,} {way:<14} {written:>8.1f} {got['seconds']:>8.1f} "
                  f"{got['seconds'] / rows * 1000:>11.4f} {got['peak_rss'] / 1e9:>11.2f} {diff:>12.1e}  {best}",
                  flush=True)
            written = 0.0


if __name__ == "__main__":
    main()
