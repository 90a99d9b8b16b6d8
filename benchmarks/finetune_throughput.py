"""Fine-tuning throughput: `featcache finetune` against the studies' usual training loop, side by side.

The ResNet50 + MobileNetV2 study's fourth setup: both backbones with their last blocks
unfrozen, late features concatenated (2048 + 1280 = 3328) -> Linear 512 -> ReLU ->
Dropout 0.2 -> Linear 10, AdamW 1e-4, basic augmentation (resize, random crop, flip),
mixed precision on a GPU. Both sides train one epoch over the same in-memory images with
the same batch size; images/s is the epoch's images over its wall time.

usual      per-image PIL resize + random crop + flip + ToTensor + Normalize in a DataLoader,
           both torchvision trunks eager, channels-first, fp16 autocast with a GradScaler on a
           GPU (the study's mixed precision), fp32 on the CPU; frozen layers run under
           autograd like the rest (requires_grad False only)
featcache  `featcache finetune --unfreeze last-block --augment basic` (frozen parts without
           stored activations, channels_last, bf16/fp16 autocast on a GPU)

Prints both rates and their ratio; record GPU figures in benchmarks/RESULTS.md.

    python benchmarks/finetune_throughput.py --device cuda --images 4096 --num-workers 8
    python benchmarks/finetune_throughput.py --images 96 --image-size 96 --batch-size 16   # CPU smoke run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_data import tiled_digits
from usual_recipe import MEAN, STD, trunk

from featcache.device import resolve_device
from featcache.data.datasets import load_dataset
from featcache.data.preprocess import PreprocessConfig
from featcache.extraction.config import ExtractConfig
from featcache.finetuning.config import FinetuneConfig
from featcache.finetuning.run import finetune
from featcache.runs.records import load_record

LAST_BLOCKS = {"resnet50": ("layer4",), "mobilenet_v2": ("features.17", "features.18")}


class AugmentedPil(torch.utils.data.Dataset):
    """The study's training transform, one PIL image at a time."""

    def __init__(self, images, labels, size):
        from torchvision import transforms

        self.images, self.labels = images, labels
        self.transform = transforms.Compose([
            transforms.Resize((size, size)), transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(MEAN, STD),
        ])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class UsualFusion(torch.nn.Module):
    def __init__(self, device, n_classes=10):
        super().__init__()
        self.trunks = torch.nn.ModuleList(trunk(name, device) for name in LAST_BLOCKS)
        for (name, blocks), net in zip(LAST_BLOCKS.items(), self.trunks):
            for param_name, param in net.named_parameters():
                param.requires_grad_(param_name.startswith(tuple(b + "." for b in blocks)))
        self.head = torch.nn.Sequential(torch.nn.Linear(3328, 512), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                        torch.nn.Linear(512, n_classes)).to(device)

    def forward(self, x):
        return self.head(torch.cat([net(x) for net in self.trunks], dim=1))


def usual_rate(images, labels, args, device) -> float:
    model = UsualFusion(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    data = torch.utils.data.DataLoader(AugmentedPil(images, labels, args.image_size), batch_size=args.batch_size,
                                       shuffle=True, num_workers=args.num_workers, pin_memory=amp)
    seen, tick = 0, time.perf_counter()
    for x, y in data:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        seen += len(y)
    if amp:
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - tick)


def featcache_rate(args, runs_dir: Path) -> float:
    features = ExtractConfig(
        data=tiled_digits(args.repeat, limit_train=args.images, limit_test=args.test, seed=0),
        backbones=tuple(LAST_BLOCKS), weights="random", preprocess=PreprocessConfig(image_size=args.image_size),
        device=args.device, precision=args.precision,
    )
    cfg = FinetuneConfig(features=features, taps="late", head="mlp", hidden=(512,), dropout=0.2, tap_norm="none",
                         unfreeze="last-block", epochs=1, optimizer="adamw", lr=1e-4, backbone_lr_scale=1.0,
                         batch_size=args.batch_size, augment="basic", val_fraction=args.val_fraction,
                         runs_dir=runs_dir, num_workers=args.num_workers)
    run = finetune(cfg, log=lambda m: None, progress=False)
    return load_record(run)["timings"]["images_per_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024, help="training images (digits, stratified)")
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--repeat", type=int, default=1, help="tile digits K times (a GPU needs more than 1,437 images)")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    args = parser.parse_args()
    device = resolve_device(args.device)
    train = load_dataset(tiled_digits(args.repeat, limit_train=args.images, limit_test=args.test)).splits["train"]
    # featcache trains on (1 - val_fraction) of the rows; the usual loop gets the same number.
    n = len(train) - max(1, round(args.val_fraction * len(train)))
    images, labels = train.images[:n], train.labels[:n]
    print(f"device {device}, {n} training images at {args.image_size} px, batch {args.batch_size}, "
          f"{args.num_workers} workers, torch {torch.__version__}")
    usual = usual_rate(images, labels, args, device)
    print(f"usual loop      {usual:8.1f} img/s")
    with tempfile.TemporaryDirectory() as tmp:
        ours = featcache_rate(args, Path(tmp))
    print(f"featcache       {ours:8.1f} img/s")
    print(f"ratio featcache/usual: {ours / usual:.2f}")


if __name__ == "__main__":
    main()
