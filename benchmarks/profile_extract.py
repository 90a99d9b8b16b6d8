"""Where `featcache extract` spends its time: cProfile of one extraction, top functions by own time.

    python benchmarks/profile_extract.py --backbone resnet18 --device cuda --repeat 8 --images 8192
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
from pathlib import Path

import torch
from bench_data import tiled_digits

from featcache.data.preprocess import PreprocessConfig
from featcache.extraction.config import ExtractConfig
from featcache.extraction.run import extract


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", action="append", default=None)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if args.device == "cuda":
        torch.ones(1, device="cuda").sum().item()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ExtractConfig(data=tiled_digits(args.repeat, limit_train=args.images, limit_test=10),
                            backbones=tuple(args.backbone or ["resnet18"]), weights="random",
                            preprocess=PreprocessConfig(image_size=args.image_size), device=args.device,
                            batch_size=args.batch_size, num_workers=2, cache_dir=Path(tmp))
        profile = cProfile.Profile()
        profile.enable()
        extract(cfg, progress=True)
        profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
