"""Photo-folder extraction, side by side in one run on the same images.

(f) featcache folder   ``featcache extract --dataset folder`` with every backbone in one
                       command: each file decoded once for all of them
(m) featcache memory   the same images served from memory (as CIFAR-10 and digits are), the
                       same backbones and flags: the ceiling for (f)
(u) usual recipe       what the studies do: torchvision ``ImageFolder`` + PIL transforms
                       (Resize, ToTensor, Normalize) in a DataLoader with the same number
                       of workers, fp32 eager model without its classifier, one backbone at
                       a time, so every file is decoded once per backbone

(f) and (m) run ``--repeats`` times, alternately (a 2-core machine shared with others has slow
spells of seconds; alternating puts them in one pair): each pair's f/m is printed, and the median.
Prints wall seconds and images/s for each, and the ratios f/m (target >= 0.8) and u/f, the
speed-up over the usual recipe for all backbones together (targets: >= 2 for two backbones at
32 px on a CPU; >= 3 for a JPEG folder at 224 px with resnet50 on a GPU, in benchmarks/gpu.sh).
The folder is written first: digits, upscaled to ``--source-size`` and tiled to ``--images``.

    python benchmarks/folder_throughput.py                                  # 32 px PNGs, resnet18 + mobilenet_v2
    python benchmarks/folder_throughput.py --device cuda --format jpg --source-size 256 \\
        --image-size 224 --backbone resnet50 --images 8192 --batch-size 128
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from extract_throughput import cpu_name
from usual_recipe import MEAN, STD, trunk

from featcache.device import cpu_has_native_bf16, resolve_device, resolve_precision
from featcache.data.datasets import DATASETS, DataRequest, Dataset, DatasetEntry, Split, load_dataset
from featcache.data.images import load_image
from featcache.data.preprocess import PreprocessConfig
from featcache.extraction.config import ExtractConfig, available_cores, workers_for
from featcache.extraction.run import extract


def write_folder(root: Path, n: int, size: int, fmt: str) -> Path:
    """``n`` digits as ``size`` px RGB files, one sub-folder per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    scale = -(-size // 8)
    for i in range(n):
        k = i % len(digits.images)
        gray = (digits.images[k] * 255 / 16).astype(np.uint8)
        gray = np.roll(np.kron(gray, np.ones((scale, scale), np.uint8))[:size, :size], i // len(digits.images), 1)
        rgb = np.stack([gray, np.roll(gray, 1, 0), 255 - gray], axis=-1)
        folder = root / str(digits.target[k])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(folder / f"{i:06d}.{fmt}", quality=90) if fmt == "jpg" else \
            Image.fromarray(rgb).save(folder / f"{i:06d}.{fmt}")
    return root


def memory_copy(request: DataRequest, pre: PreprocessConfig) -> DataRequest:
    """The folder's images decoded once and registered as an in-memory dataset ``folder-in-memory``."""
    data = load_dataset(request)
    splits = {name: Split(labels=s.labels, index=s.index, images=np.stack([load_image(f, pre, resize=False)
                                                                             for f in s.files]))
              for name, s in data.splits.items()}
    loaded = Dataset("folder-in-memory", data.classes, splits)
    DATASETS.register("folder-in-memory")(DatasetEntry(key=lambda r: "folder-in-memory",
                                                       identity=lambda r: {"copy_of": str(request.data_dir)},
                                                       load=lambda r: loaded))
    return DataRequest(name="folder-in-memory", test_fraction=request.test_fraction)


def featcache_seconds(request: DataRequest, args, cache: Path) -> tuple[float, dict]:
    cfg = ExtractConfig(data=request, backbones=tuple(args.backbone), weights="random",
                        preprocess=PreprocessConfig(image_size=args.image_size), device=args.device,
                        batch_size=args.batch_size, num_workers=args.num_workers, cache_dir=cache)
    started = time.perf_counter()
    results = extract(cfg, progress=False, log=lambda m: None)
    return time.perf_counter() - started, results[0].timings


def usual_seconds(root: Path, args) -> float:
    """ImageFolder + PIL transforms + DataLoader, one backbone after the other, fp32."""
    from torchvision import datasets, transforms

    device = resolve_device(args.device)
    transform = transforms.Compose([transforms.Resize(args.image_size), transforms.CenterCrop(args.image_size),
                                    transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    started = time.perf_counter()
    for name in args.backbone:
        net = trunk(name, device)
        loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(root), transform=transform),
                                             batch_size=args.batch_size,
                                             num_workers=available_cores() if args.num_workers is None else args.num_workers,
                                             pin_memory=device.type == "cuda")
        with torch.inference_mode():
            for x, _ in loader:
                net(x.to(device, non_blocking=True)).cpu()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", action="append", help="repeat for several [resnet18, mobilenet_v2]")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--source-size", type=int, default=32, help="pixels of the files written")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--format", default="png", choices=("png", "jpg"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="(f) and (m) alternately, this many times each")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="featcache's --num-workers [default: featcache's own]; the usual recipe uses every core")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be 1 or more")
    args.backbone = args.backbone or ["resnet18", "mobilenet_v2"]
    device = resolve_device(args.device)
    print(f"CPU: {cpu_name()} (native bf16: {cpu_has_native_bf16()}); device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
          + f"; featcache precision {resolve_precision('auto', device)}, usual recipe fp32; featcache "
            f"{workers_for(device, args.num_workers)} decoding processes, usual recipe "
            f"{available_cores() if args.num_workers is None else args.num_workers}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_folder(tmp / "photos", args.images, args.source_size, args.format)
        for path in root.rglob("*.*"):  # every file read once before any timing: all three runs find them cached
            path.read_bytes()
        request = DataRequest(name="folder", data_dir=root, test_fraction=0.2)
        pre = PreprocessConfig(image_size=args.image_size)
        n = args.images
        memory = memory_copy(request, pre)
        # warm-up, untimed: the first extraction in a process pays one-off costs (imports, kernel set-up)
        featcache_seconds(DataRequest(name="folder-in-memory", test_fraction=0.2, limit_train=64, limit_test=16),
                          args, tmp / "cache-warm-up")
        # (f) and (m) alternate, so a slow spell of a shared machine hits one pair, not one side
        pairs = []
        for k in range(args.repeats):
            folder_s, phases = featcache_seconds(request, args, tmp / f"cache-folder-{k}")
            memory_s, memory_phases = featcache_seconds(memory, args, tmp / f"cache-memory-{k}")
            pairs.append((folder_s, memory_s))
            print(f"repeat {k + 1}: (f) {folder_s:.2f} s, (m) {memory_s:.2f} s, f/m {memory_s / folder_s:.2f}")
            for label, timings in (("  (f)", phases), ("  (m)", memory_phases)):
                print(f"{label} phases: " + ", ".join(f"{phase} {s:.2f} s" for phase, s in timings.items()))
        usual_s = usual_seconds(root, args)
    both = "+".join(args.backbone)
    print(f"{n} {args.format} files of {args.source_size} px at {args.image_size} px, {both}, batch {args.batch_size}")
    folder_s, memory_s = (float(np.median(side)) for side in zip(*pairs))
    median = "the median of " if args.repeats > 1 else ""
    for label, seconds in (("(f) featcache folder", folder_s), ("(m) featcache memory", memory_s),
                           ("(u) usual recipe", usual_s)):
        print(f"{label:<22}{seconds:8.1f} s  {n / seconds:8.1f} img/s (every backbone)")
    ratios = sorted(m / f for f, m in pairs)
    print(f"f/m {float(np.median(ratios)):.2f} ({median}{len(ratios)}: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"target >= 0.8)   u/f {usual_s / folder_s:.2f} (featcache's speed-up, against (f)'s median)")


if __name__ == "__main__":
    main()
