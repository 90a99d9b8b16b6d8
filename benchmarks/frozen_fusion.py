"""Frozen fusion, the studies' way against featcache's, side by side on the same data.

studies' way   two frozen backbones run in every epoch (per-image PIL resize in a
               DataLoader, fp32 eager models), their late features concatenated and fed to
               Linear(C -> 512) -> ReLU -> Dropout(0.2) -> Linear, Adam, E epochs
featcache      `featcache extract` of both backbones once, then the same head, optimizer,
               epochs and batch size on the cached features; wall time includes the
               extraction

Both ways fuse the same way (--tap-norm, default standard: each backbone's features
standardised with the training statistics of the cache, then concatenated), so they train
the same head on the same features and their accuracies can be compared. With random
weights the studies' plain concatenation (--tap-norm none) learns next to nothing in
5 epochs (benchmarks/RESULTS.md), which would make any accuracy comparison empty.

Prints both wall times, their ratio and both test accuracies (target: ratio >= 4 at E = 5,
accuracies within one point). Second figure: the time to train logreg, svm and mlp on
every pair (tap of backbone 1, tap of backbone 2) from the one cache.

Weights are random (offline); the data are scikit-learn's digits, so the absolute
accuracies say nothing about ImageNet features, only that both ways learn the same thing.

    python benchmarks/frozen_fusion.py                                # resnet50 + mobilenet_v2, 128 px
    python benchmarks/frozen_fusion.py --image-size 224 --train 5000 --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from usual_recipe import PilImages, trunk

from featcache.backbones.registry import BACKBONES
from featcache.data.datasets import DataRequest, load_dataset
from featcache.data.preprocess import PreprocessConfig
from featcache.extraction.config import ExtractConfig
from featcache.extraction.run import extract
from featcache.fuse.caches import load_features, locate_caches
from featcache.fuse.fusion import TapNormalizer, parse_taps
from featcache.fuse.heads import HeadOptions
from featcache.fuse.torch_head import TorchClassifier
from featcache.fuse.train import FuseTrainConfig, fuse_train


def studies_way(names, data, args, device, norm) -> tuple[float, float]:
    from featcache.finetuning.model import TapNorm

    started = time.perf_counter()
    train, test = data.splits["train"], data.splits["test"]
    nets = [trunk(n, device) for n in names]
    fuse = TapNorm(norm).to(device)  # a fixed affine per backbone: same fusion as the featcache side
    dim = sum(BACKBONES[n].tap("late").channels for n in names)
    torch.manual_seed(args.seed)
    head = torch.nn.Sequential(torch.nn.Linear(dim, 512), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                               torch.nn.Linear(512, len(data.classes))).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=args.lr)
    loader = torch.utils.data.DataLoader(PilImages(train.images, args.image_size, train.labels),
                                         batch_size=args.batch_size, shuffle=True, num_workers=2,
                                         generator=torch.Generator().manual_seed(args.seed))
    for _ in range(args.epochs):
        head.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                feats = fuse([net(x) for net in nets])  # recomputed every epoch
            loss = torch.nn.functional.cross_entropy(head(feats), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    correct = 0
    test_loader = torch.utils.data.DataLoader(PilImages(test.images, args.image_size, test.labels),
                                              batch_size=args.batch_size, num_workers=2)
    with torch.no_grad():
        for x, y in test_loader:
            x = x.to(device)
            pred = head(fuse([net(x) for net in nets])).argmax(1).cpu()
            correct += (pred == y).sum().item()
    return time.perf_counter() - started, correct / len(test)


def featcache_way(names, request, args, cache_dir) -> tuple[float, float]:
    started = time.perf_counter()
    cfg = ExtractConfig(data=request, backbones=tuple(names), weights="random",
                        preprocess=PreprocessConfig(image_size=args.image_size), device=args.device,
                        batch_size=64, cache_dir=cache_dir)
    extract(cfg, progress=False)
    refs = parse_taps("late", cfg)
    data = load_features(locate_caches(cfg), set(refs), allow_dead=True)  # random weights: speed, not accuracy
    norm = TapNormalizer(args.tap_norm).fit([data.taps[("train", r)] for r in refs])
    head = TorchClassifier(hidden=(512,), dropout=0.2, optimizer="adam", lr=args.lr, epochs=args.epochs,
                           batch_size=args.batch_size, patience=None, device=cfg.device if cfg.device != "auto" else
                           ("cuda" if torch.cuda.is_available() else "cpu"), random_state=args.seed)
    head.fit(norm.transform([data.taps[("train", r)] for r in refs]), data.labels["train"])
    acc = head.score(norm.transform([data.taps[("test", r)] for r in refs]), data.labels["test"])
    return time.perf_counter() - started, acc, cfg, norm


def all_pairs(names, cfg, args, runs_dir) -> tuple[float, int]:
    a, b = (BACKBONES[n] for n in names)
    taps = tuple(f"{a.name}:{ta},{b.name}:{tb}" for ta in a.tap_names for tb in b.tap_names)
    train = FuseTrainConfig(features=cfg, taps=taps, heads=("logreg", "svm", "mlp"), runs_dir=runs_dir,
                            options=HeadOptions(epochs=30, batch_size=args.batch_size, seed=args.seed,
                                                device="cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"))
    started = time.perf_counter()
    runs = fuse_train(train, log=lambda m: None)
    return time.perf_counter() - started, len(runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="resnet50,mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tap-norm", default="standard", help="fusion of both ways: standard, l2 or none")
    parser.add_argument("--skip-pairs", action="store_true", help="only the first figure")
    parser.add_argument("--skip-speed", action="store_true", help="only the second figure")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    names = args.backbones.split(",")
    request = DataRequest(name="digits", limit_train=args.train, limit_test=args.test, seed=args.seed)
    data = load_dataset(request)
    print(f"{'+'.join(names)}, {args.image_size} px, {len(data.splits['train'])} train / {len(data.splits['test'])} "
          f"test digits, E = {args.epochs}, Adam lr {args.lr}, batch {args.batch_size}, device {device} "
          f"({torch.get_num_threads()} threads), random weights, tap norm {args.tap_norm}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        fast, fast_acc, cfg, norm = featcache_way(names, request, args, Path(tmp) / "cache")
        if not args.skip_speed:
            slow, slow_acc = studies_way(names, data, args, device, norm)
            print(f"studies' way {slow:8.1f} s  test acc {slow_acc:.4f}\n"
                  f"featcache    {fast:8.1f} s  test acc {fast_acc:.4f}  (extraction included)\n"
                  f"ratio {slow / fast:.2f}x  accuracy difference {100 * (fast_acc - slow_acc):+.2f} points",
                  flush=True)
        if not args.skip_pairs:
            seconds, n = all_pairs(names, cfg, args, Path(tmp) / "runs")
            print(f"all tap pairs: {n} runs (logreg, svm, mlp on every pair of taps, validation-selected) "
                  f"from one cache in {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
