"""Are features extracted on another device / precision faithful to the CPU's fp32 ones?

Extracts the same images twice (float32 storage): once on the CPU in fp32, once with
``--device D --precision P``; prints the smallest and the median per-image cosine of every
tap. featcache's promise for reduced precision: per-image cosine >= 0.999 on every tap.

    python benchmarks/device_fidelity.py --device cuda --precision auto
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from featcache.data.datasets import DataRequest
from featcache.data.preprocess import PreprocessConfig
from featcache.extraction.config import ExtractConfig
from featcache.extraction.reader import FeatureCache
from featcache.extraction.run import extract


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="resnet18,resnet50,mobilenet_v2,vgg16")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    worst = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        caches = []
        for device, precision in (("cpu", "fp32"), (args.device, args.precision)):
            cfg = ExtractConfig(data=DataRequest(name="digits", limit_train=args.images, limit_test=10),
                                backbones=tuple(args.backbones.split(",")), weights="random", dtype="float32",
                                preprocess=PreprocessConfig(image_size=args.image_size), device=device,
                                precision=precision, batch_size=64, num_workers=0,
                                cache_dir=Path(tmp) / f"{device}-{precision}")
            caches.append(extract(cfg, progress=False, log=lambda m: None))
        for ref, other in zip(*caches):
            with FeatureCache(ref.path) as a, FeatureCache(other.path) as b:
                precision = b.fingerprint.get("precision")
                for tap in a.taps("train"):
                    x, y = a.read("train", tap), b.read("train", tap)
                    cos = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-30)
                    worst = min(worst, float(cos.min()))
                    print(f"{ref.backbone:13s} {tap:12s} {args.device} {precision}: per-image cosine min "
                          f"{cos.min():.5f} median {np.median(cos):.5f}")
    print(f"smallest per-image cosine over every tap: {worst:.5f} ({'meets' if worst >= 0.999 else 'MISSES'} 0.999)")


if __name__ == "__main__":
    main()
