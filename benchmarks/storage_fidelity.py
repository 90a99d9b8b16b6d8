"""float16 storage against float32, tap by tap: cosine per image, dead taps, bytes on disk, extraction seconds.

Issue 32's figure for storage that keeps taps outside float16's range alive (a power-of-two scale per tap,
``extraction.store.storage_scale``). Random weights put efficientnet_b0's late stages near 1e-13 and leave
mobilenet_v2's late taps tiny: before the scale, float16 stored them as zeros (DEAD). Each backbone is extracted
twice from the same images, ``--dtype float16`` (the default) and ``float32``; for every tap it prints the largest
|value|, the scale the cache chose, the smallest cosine over the images between the two, whether either is dead, and
the two files' sizes and times.

    python benchmarks/storage_fidelity.py
    python benchmarks/storage_fidelity.py --backbones efficientnet_b0 --train 256 --image-size 96
    python benchmarks/storage_fidelity.py --device cuda      # the storage step of benchmarks/gpu.sh
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from featcache.data.preprocess import PreprocessConfig
from featcache.data.source import DataRequest
from featcache.extraction.config import ExtractConfig
from featcache.extraction.reader import FeatureCache
from featcache.extraction.run import extract
from featcache.extraction.store import stored_scale


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="efficientnet_b0,mobilenet_v2,resnet18")
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    worst = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones.split(","):
            read, info = {}, {}
            for dtype in ("float16", "float32"):
                cfg = ExtractConfig(data=DataRequest(name="digits", limit_train=args.train, limit_test=16),
                                    backbones=(backbone,), weights="random", dtype=dtype, device=args.device,
                                    preprocess=PreprocessConfig(image_size=args.image_size), cache_dir=Path(tmp) / dtype)
                start = time.perf_counter()
                [result] = extract(cfg, progress=False, log=lambda m: None)
                seconds = time.perf_counter() - start
                with FeatureCache(result.path) as cache:
                    taps = cache.tap_names("train")
                    read[dtype] = {t: cache.read("train", t).astype(np.float32) for t in taps}
                    dead = {t: cache.dead(t) for t in taps}
                    scales = {t: stored_scale(cache.file["train"]["taps"][t]) for t in taps}
                info[dtype] = (dead, scales, result.path.stat().st_size, seconds)
            print(f"{backbone}: float16 {info['float16'][2] / 1024:.0f} KiB in {info['float16'][3]:.1f} s, float32 "
                  f"{info['float32'][2] / 1024:.0f} KiB in {info['float32'][3]:.1f} s")
            for tap, exact in read["float32"].items():
                half = read["float16"][tap]
                norms = np.linalg.norm(half, axis=1) * np.linalg.norm(exact, axis=1)
                cosine = float(np.min(np.where(norms > 0, (half * exact).sum(1) / np.where(norms > 0, norms, 1), 1.0)))
                worst = min(worst, cosine)
                dead16, dead32 = info["float16"][0][tap], info["float32"][0][tap]
                print(f"  {tap:<16} largest {np.abs(exact).max():9.2e}  scale {info['float16'][1][tap]:9.3g}  "
                      f"cosine min {cosine:.7f}  dead: float16 {'yes' if dead16 else 'no'}, "
                      f"float32 {'yes' if dead32 else 'no'}")
    print(f"smallest cosine over every tap and image: {worst:.7f} (target >= 0.9999)")


if __name__ == "__main__":
    main()
