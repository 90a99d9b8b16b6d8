"""The hf:, openclip: and --module paths on a device against the CPU: the same taps, to the device's precision.

Issue 43's sources have only run on a CPU. This builds, offline, a small Hugging Face ViT checkpoint (a
``save_pretrained`` folder with its processor) and a small OpenCLIP ViT (a registered config, random weights),
extracts scikit-learn's digits through each on ``--device`` and on the CPU (fp32 both: ``--precision fp32``), with
a ``--module`` tap beside the model's own, and prints per tap the largest difference relative to the tap's
scale, and the images/s on the device.

    python benchmarks/model_sources.py --device cuda      # benchmarks/gpu.sh's step
    python benchmarks/model_sources.py --device cpu       # a smoke test: differences are 0
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main():
    import open_clip
    import torch
    import transformers

    import featcache
    from featcache.extraction.reader import FeatureCache

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=1797)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="featcache-sources-"))
    torch.manual_seed(0)
    vit = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=64,
               patch_size=8)
    transformers.ViTModel(transformers.ViTConfig(**vit)).save_pretrained(work / "vit")
    transformers.ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(work / "vit")
    (work / "clip").mkdir()
    (work / "clip" / "bench-vit.json").write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(work / "clip")
    cases = [(f"hf:{work / 'vit'}", "imagenet", "layers.1.mlp.fc1"), ("openclip:bench-vit", "random", "ln_post")]
    limit = min(args.images, 1797)
    for name, weights, module in cases:
        got = {}
        for device in (args.device, "cpu"):
            started = time.perf_counter()
            path = featcache.extract(backbone=[name], weights=weights, modules=[module], pooling="cls+avg",
                                     precision="fp32", device=device, cache_dir=work / f"cache-{device}",
                                     limit_train=int(limit * 0.8), limit_test=limit - int(limit * 0.8), quiet=True)
            seconds = time.perf_counter() - started
            with FeatureCache(path) as cache:
                got[device] = {t: cache.read("train", t).astype(np.float32) for t in cache.taps("train")}
            if device == args.device:
                print(f"{name} on {device}: {limit} images in {seconds:.1f} s ({limit / seconds:.0f} img/s, "
                      f"setup included)")
        for tap, values in got["cpu"].items():
            scale = float(np.abs(values).max()) or 1.0
            print(f"  {tap:<28} max |{args.device} - cpu| / max |cpu| = "
                  f"{float(np.abs(got[args.device][tap] - values).max()) / scale:.2e}")


if __name__ == "__main__":
    main()
