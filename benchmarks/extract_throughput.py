"""Extraction throughput, side by side in one run on the same images.

(a) featcache extract      the real stage: data, preprocessing on the device, forward of
                           every tap, pooling, HDF5 writes; wall time including model set-up
(b) bare forward           the same prepared network on already-preprocessed batches at the
                           same batch size and precision: the ceiling for (a)
(c) usual recipe           what the studies do: per-image PIL resize to the input size in a
                           DataLoader (2 workers), ToTensor + Normalize, fp32, plain eager
                           torchvision model with its classifier removed, one backbone at a time
(d) plain eager forward    (c)'s network on preprocessed batches, for reference

Prints images/s for each and the ratios a/b and a/c. Targets (issue 2, 2-core CPU,
resnet50 at 224): a/b >= 0.85 and a/c >= 2.5.

    python benchmarks/extract_throughput.py                        # resnet50, 224 px, 1024 digits
    python benchmarks/extract_throughput.py --backbone all --images 2048 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from bench_data import tiled_digits
from usual_recipe import PilImages, trunk

from featcache.backbones.registry import BACKBONES
from featcache.device import autocast, cpu_has_native_bf16, onednn_isa_cap, resolve_device, resolve_precision
from featcache.backbones.taps import tap_model
from featcache.data.datasets import load_dataset
from featcache.data.preprocess import PreprocessConfig, to_input
from featcache.extraction.config import ExtractConfig, preprocess_for
from featcache.extraction.run import extract


def cpu_name() -> str:
    """'AMD EPYC (family 25, model 17)' from /proc/cpuinfo, or what platform knows."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
    return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_featcache(cfg: ExtractConfig, n: int) -> float:
    """Seconds of one ``extract`` of ``n`` images, with where they went: the fixed costs are the run less
    every image at the steady batches' rate (the first batch's own images are work, its warm-up is not)."""
    start = time.perf_counter()
    results = extract(cfg, progress=False)
    seconds = time.perf_counter() - start
    assert all(r.status == "extracted" for r in results)
    phases = results[0].timings
    steady = phases["pass"] - phases.get("first batch", 0.0)  # the loop over batches, less the first one
    fixed = seconds - n * steady / (n - min(cfg.batch_size, n - 1))
    print(f"    featcache phases: {seconds:.2f} s in all; setup {phases['setup']:.2f} s, first batch "
          f"{phases.get('first batch', 0):.2f} s, steady batches {steady:.2f} s (host time in data "
          f"{phases.get('data', 0):.2f}, network {phases.get('network', 0):.2f}; writer thread busy "
          f"{phases.get('writes', 0):.2f}); outside the steady batches {100 * (1 - steady / seconds):.1f}%, "
          f"fixed costs {fixed:.2f} s = {100 * fixed / seconds:.1f}%", flush=True)
    return seconds


def timed_forward(model, images, cfg, device, precision="fp32", layout=torch.channels_last) -> float:
    """Seconds of the forward passes alone, on batches preprocessed on the device beforehand."""
    batches = [to_input(torch.from_numpy(images[i : i + cfg.batch_size]).to(device), cfg.preprocess)
               .contiguous(memory_format=layout) for i in range(0, len(images), cfg.batch_size)]
    with torch.inference_mode(), autocast(device, precision):
        model(batches[0])  # warm-up
        sync(device)
        start = time.perf_counter()
        for x in batches:
            model(x)
        sync(device)
    return time.perf_counter() - start


def run_usual(name, images, size, batch_size, device) -> float:
    start = time.perf_counter()
    net = trunk(name, device)
    loader = torch.utils.data.DataLoader(PilImages(images, size), batch_size=batch_size, num_workers=2)
    features = []
    with torch.no_grad():
        for x in loader:
            features.append(net(x.to(device)).cpu().numpy())
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50",
                        help="any backbone featcache takes (resnet50, efficientnet_b0, timm:vit_small_patch16_224, ...), "
                             "'all' for the four study backbones, or several separated by commas")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=None, help="[default: each backbone's own; 224 for the study ones]")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--repeat", type=int, default=1, help="tile digits K times (a GPU needs more than 1,437 images)")
    parser.add_argument("--together", action="store_true",
                        help="also time one featcache extract of every backbone in one command (one pass over the data)")
    parser.add_argument("--compile", action="store_true", help="also time featcache extract --compile")
    args = parser.parse_args()

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    names = ["resnet18", "resnet50", "mobilenet_v2", "vgg16"] if args.backbone == "all" else args.backbone.split(",")
    request = tiled_digits(args.repeat, limit_train=args.images, limit_test=10)
    images = load_dataset(request).splits["train"].images
    n = len(images) + 10  # featcache also extracts the 10 test images
    cap = f", oneDNN capped at {onednn_isa_cap().upper()}" if onednn_isa_cap() else ""
    print(f"CPU: {cpu_name()}{cap}, native bf16: {'yes' if cpu_has_native_bf16() else 'no'}; (a) and (b) run at "
          f"--precision {args.precision} = {precision}, (c) and (d) in fp32 as the studies do")
    print(f"device {device} ({torch.get_num_threads()} threads), precision {precision}, batch {args.batch_size}, "
          f"{args.image_size or 'native'} px, {len(images)} digits images (+10 test for featcache), torch {torch.__version__}")
    # Process start-up is paid here, not by the first backbone's (a): importing torchvision's
    # models (which imports torch._dynamo, 1.7 s on the 2-core CPU) and CUDA's context.
    import torchvision.models  # noqa: F401

    if device.type == "cuda":
        torch.ones(1, device=device).sum().item()
    rows = []
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            spec = BACKBONES.lookup(name)
            cfg = ExtractConfig(data=request, backbones=(name,), weights="random",
                                preprocess=PreprocessConfig.from_model(image_size=args.image_size),
                                precision=args.precision, device=args.device, batch_size=args.batch_size,
                                num_workers=2, cache_dir=Path(tmp))
            size = preprocess_for(cfg, spec).image_size
            a = n / run_featcache(cfg, n)
            cfg = dataclasses.replace(cfg, preprocess=preprocess_for(cfg, spec))  # (b)-(d) see the same input
            model = tap_model(spec, "random", 0, "avg", device)
            b = len(images) / timed_forward(model, images, cfg, device, precision)
            c = len(images) / run_usual(name, images, size, args.batch_size, device)
            d = len(images) / timed_forward(trunk(name, device), images, cfg, device, layout=torch.contiguous_format)
            compiled = None
            if args.compile:
                compiled = n / run_featcache(dataclasses.replace(cfg, compile=True, cache_dir=Path(tmp) / "c"), n)
        rows.append((name, a, b, c, d, compiled))
        extra = f"  (a') with --compile {compiled:7.1f} img/s  a'/c {compiled / c:4.2f}" if compiled else ""
        print(f"{name:13s} (a) featcache {a:7.1f} img/s  (b) bare forward {b:7.1f}  (c) usual recipe {c:7.1f}  "
              f"(d) plain eager forward {d:7.1f}  |  a/b {a / b:4.2f}  a/c {a / c:4.2f}{extra}", flush=True)
    if args.together and len(names) > 1:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ExtractConfig(data=request, backbones=tuple(names), weights="random",
                                preprocess=PreprocessConfig.from_model(image_size=args.image_size),
                                precision=args.precision, device=args.device, batch_size=args.batch_size,
                                num_workers=2, cache_dir=Path(tmp))
            together = run_featcache(cfg, n)
        apart = sum(n / row[1] for row in rows)
        print(f"(e) all {len(names)} backbones in one featcache extract: {together:.1f} s, against {apart:.1f} s "
              f"for the separate runs (a): {apart / together:.2f}x")


if __name__ == "__main__":
    main()

