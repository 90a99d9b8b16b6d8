"""The probes at CIFAR-10 size, each head as a user runs it: one whole ``featcache sweep`` command per head.

Issue 44's benchmark: 50,000 training / 10,000 test PNGs of 32 px in 10 class folders (generated striped
textures with heavy noise: a CIFAR-shaped task that random-weight features only half solve, not a separable
one), extracted through resnet18 and mobilenet_v2 (random weights, the default float16 cache) before any
timing, then ``featcache sweep --combos 0 --taps late --head H`` for each head: the two late taps fused
(512 + 1,280 = 1,792 columns), 45,000 fit / 5,000 validation rows, the head's default grid chosen on
validation, the test split scored once, the best kept as a run (the default ``--keep``). Each command is
timed whole, in a fresh process, as a user's would be.

``--against REV`` (repeatable) runs the same commands from another commit too (its files from ``git archive``,
its own cache extracted from the same images by its own code, untimed), alternating the sides round by round,
and prints each head's seconds side by side with their ratio, the chosen hyper-parameter and the accuracies.

    python benchmarks/probes.py                               # this tree: logreg, svm, knn
    python benchmarks/probes.py --against 38fba97 --rounds 2   # against a previous main, two rounds each
    python benchmarks/probes.py --heads logreg --against A --against B   # a bisection step
    python benchmarks/probes.py --device cuda                  # benchmarks/gpu.sh's step (target 5 s per head)
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from bench_data import stripes

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", default="logreg,svm,knn")
    parser.add_argument("--against", action="append", default=[], metavar="REV",
                        help="also time this commit's sweep (repeatable); the working tree is always timed")
    parser.add_argument("--rounds", type=int, default=1, help="times each side runs each head, alternating [1]")
    parser.add_argument("--train", type=int, default=50000)
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--noise", type=float, default=90.0, help="pixel noise of the generated images [90]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/featcache-probes"),
                        help="folder for the images, each side's code and cache, and the runs [/tmp/featcache-probes]")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / f"images-{args.train}-{args.test}-{args.noise:g}"
    if not (data / "done").exists():
        started = time.perf_counter()
        stripes(data / "train", args.train, size=32, noise=args.noise)
        stripes(data / "test", args.test, size=32, noise=args.noise, first=args.train)
        (data / "done").touch()
        print(f"images written in {time.perf_counter() - started:.0f} s: {data}", flush=True)
    sides = {"this tree": ROOT, **{rev: source_of(rev, args.work) for rev in args.against}}
    # --dataset folder: commits before 2026-12-07 read --data-dir alone as digits' (their extraction took 11 s)
    flags = ["--dataset", "folder", "--data-dir", str(data), "--backbone", "resnet18", "--backbone", "mobilenet_v2", "--weights", "random",
             "--image-size", "32", "--device", args.device]
    for side, code in sides.items():
        started = time.perf_counter()
        cli(code, "extract", *flags, "--cache-dir", cache_of(side, args.work), "-q")
        print(f"{side}: cache ready in {time.perf_counter() - started:.0f} s (untimed)", flush=True)
    cpu = cpu_name()
    heads = args.heads.split(",")
    seen: dict = {}
    for round_ in range(args.rounds):
        for head in heads:
            for side, code in (sides.items() if round_ % 2 == 0 else reversed(sides.items())):
                runs = args.work / "runs" / f"{side.replace(' ', '-')}-{head}-{round_}-{time.time_ns()}"
                started = time.perf_counter()
                cli(code, "sweep", *flags, "--cache-dir", cache_of(side, args.work), "--combos", "0", "--taps",
                    "late", "--head", head, "--runs-dir", runs, "-q")
                seconds = time.perf_counter() - started
                row = table_row(runs)
                seen.setdefault((head, side), []).append((seconds, row))
                print(f"  {head:6s} {side:>12s}: {seconds:6.1f} s  chose {row.get('chosen', '?')}, val "
                      f"{row.get('val_acc', '?')}, test {row.get('test_acc', '?')}", flush=True)
    print(f"\n{cpu}, {os.cpu_count()} cores, {args.device}; whole `featcache sweep` commands, best of "
          f"{args.rounds} round(s):")
    for head in heads:
        mine = min(s for s, _ in seen[(head, "this tree")])
        line = f"  {head:6s} this tree {mine:6.1f} s"
        for rev in args.against:
            theirs = min(s for s, _ in seen[(head, rev)])
            line += f" | {rev} {theirs:6.1f} s (this / that {mine / theirs:.2f})"
        target = 30 if args.device == "cpu" else 5
        print(line + f"  [target <= {target} s]")


def source_of(rev: str, work: Path) -> Path:
    """The files of commit ``rev`` (``git archive``), unpacked once under ``work``."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True,
                            check=True).stdout.strip()
    folder = work / f"src-{commit}"
    if not (folder / "featcache").exists():
        archive = work / f"{commit}.tar"
        subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), commit], check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
        archive.unlink()
    return folder


def cache_of(side: str, work: Path) -> Path:
    return work / ("cache-this-tree" if side == "this tree" else f"cache-{side}")


def cli(code: Path, *args) -> None:
    """``python -m featcache ARGS`` with ``code`` first on the path, in the work folder's parent."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run([sys.executable, "-m", "featcache", *map(str, args)], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"{code}: featcache {args[0]} failed:\n{done.stderr[-3000:]}")


def table_row(runs: Path) -> dict:
    """The sweep's one row (chosen hyper-parameters and accuracies), from its table.csv."""
    tables = list((runs / "sweeps").glob("*/table.csv"))
    if not tables:
        return {}
    with open(tables[0], newline="") as f:
        rows = list(csv.DictReader(f))
    return {key: rows[0].get(key) for key in ("chosen", "params", "val_acc", "test_acc") if key in rows[0]} if rows else {}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
