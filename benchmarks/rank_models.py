"""``featcache rank`` over 20 small timm models (random weights, 1,000 digits at 64 px): wall time, peak memory and
disk (issue 31, point 7).

timm's 18 ``test_*`` models (tiny versions of its families: ResNet, ConvNeXt, EfficientNet, ViT, MaxViT, CoAtNet,
NFNet, MambaOut ...) and two small real ones. Prints the closing table, the failures with their reasons, the
wall seconds, the peak resident memory of the process, and the disk the caches take with ``--keep-caches all``
and then ``none`` (a second ranking into a new folder).

    python benchmarks/rank_models.py [--device cuda]
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

from extract_throughput import cpu_name

import featcache

MODELS = ["timm:test_*", "timm:resnet10t", "timm:mobilenetv3_small_050"]


def disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}; device {args.device}")
    common = dict(backbone=MODELS, dataset="digits", limit_train=1000, limit_test=300, weights="random",
                  image_size=64, device=args.device, score=["logme", "hscore", "hscore_reg"], max_models=25, quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        table = featcache.rank(**common, cache_dir=root / "cache", runs_dir=root / "runs")
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        ok = table[table["status"] == "ok"]
        print(f"{table['model'].nunique()} models, {len(ok)} taps scored, {(table['status'] != 'ok').sum()} failed")
        print(f"wall {seconds:.1f} s; peak resident memory {peak:.0f} MiB; caches {disk(root / 'cache') / 2**20:.1f} MiB "
              f"(--keep-caches all)")
        started = time.perf_counter()
        again = featcache.rank(**common, cache_dir=root / "cache", runs_dir=root / "runs")
        print(f"the same ranking again (every model finished: resumed, nothing redone): {time.perf_counter() - started:.1f} s")
        assert again.equals(table)
        featcache.rank(**common, cache_dir=root / "none", runs_dir=root / "runs-none", keep_caches="none")
        print(f"--keep-caches none: caches {disk(root / 'none') / 2**20:.2f} MiB left")
        print(table.head(12).to_string(index=False))
        failed = table[table["status"] != "ok"]
        for _, row in failed.iterrows():
            print(f"failed: {row['model']}: {row['reason']}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
