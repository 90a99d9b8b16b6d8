"""Stage 1: one forward pass per batch, every tap pooled, streamed to the HDF5 store.

Flow: dataset -> backbone -> **extract** -> store. In-memory images (CIFAR-10, digits)
travel to the device as uint8 batches and are resized and normalised there; image files
are decoded and resized by DataLoader workers. The network is prepared once for
inference (conv+BN folded, channels_last, optional ``torch.compile``) and runs under
``inference_mode`` with autocast where the precision asks for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.backbones import BACKBONES, BackboneSpec, build_backbone
from featcache.config import ExtractConfig, PreprocessConfig, fingerprint, resolve_device, resolve_precision
from featcache.datasets import Dataset, Split, dataset_key, load_dataset
from featcache.errors import FeatcacheError
from featcache.store import CacheWriter, FeatureCache, cache_file, locked, write_timing

AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}
FLOAT16_TINY = 2.0**-14  # smallest normal float16


def autocast(device, precision: str):
    """torch.autocast for a resolved precision; a no-op for fp32."""
    import torch

    return torch.autocast(device.type, dtype=getattr(torch, AUTOCAST.get(precision, "float32")),
                          enabled=precision in AUTOCAST)


@dataclass(frozen=True)
class ExtractResult:
    backbone: str
    path: Path
    status: str  # "cached", "extracted" or "resumed"
    seconds: float
    images: int


def pooled_dim(channels: int, pooling: str) -> int:
    return 2 * channels if pooling == "avgmax" else channels


def pool(x, pooling: str):
    """Global pooling of an (N, C, H, W) map to (N, C) or (N, 2C) for ``avgmax``."""
    import torch

    if pooling == "avg":
        return x.mean(dim=(2, 3))
    if pooling == "max":
        return x.amax(dim=(2, 3))
    return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def tap_model(spec: BackboneSpec, weights: str, seed: int, pooling: str, device):
    """The backbone cut at its taps, returning ``{tap: pooled (N, C)}`` in one pass."""
    import torch
    from torch.fx.experimental.optimization import fuse
    from torchvision.models.feature_extraction import create_feature_extractor

    nodes = spec.tap_names
    backbone = build_backbone(spec, weights, seed)
    extractor = create_feature_extractor(backbone, return_nodes={n: n for n in nodes}).eval()
    # Fold BatchNorm into the convolutions. In place: deep-copying torchvision's
    # feature extractor puts it back into training mode, where folding is invalid.
    extractor = fuse(extractor, inplace=True)

    class TapModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.extractor = extractor

        def forward(self, x):
            maps = self.extractor(x)
            return {n: pool(maps[n], pooling) for n in nodes}

    return TapModel().eval().requires_grad_(False).to(device, memory_format=torch.channels_last)


def compiled(model):
    """``torch.compile`` with weights frozen into the graph (pays off on large datasets)."""
    import torch
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # constant-fold weights into the compiled graph
    return torch.compile(model, dynamic=False)


def to_input(images, pre: PreprocessConfig):
    """uint8 (N, H, W, 3) on the device -> normalised float (N, 3, S, S), channels_last."""
    import torch

    x = resized(images, pre)
    mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def resized(images, pre: PreprocessConfig):
    """uint8 (N, H, W, 3) -> float (N, 3, S, S) in [0, 1], resized as ``pre`` says (what the backbone sees)."""
    import torch.nn.functional as F

    x = images.permute(0, 3, 1, 2).float().div_(255.0)  # NHWC memory is channels_last
    size = pre.image_size
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        if pre.resize == "stretch" or h == w:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        else:
            scale = size / min(h, w)
            nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
            top, left = (nh - size) // 2, (nw - size) // 2
            x = x[..., top : top + size, left : left + size]
    return x


class FileImages:
    """Map-style dataset of image files -> uint8 (S, S, 3), decoded in DataLoader workers.

    A file that cannot be decoded yields an error message instead of raising, so the main
    process can name it in one line rather than print a worker traceback.
    """

    def __init__(self, files, pre: PreprocessConfig):
        self.files = files
        self.pre = pre

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import torch

        try:
            return torch.from_numpy(load_image(self.files[i], self.pre)), ""
        except Exception as exc:  # PIL raises many types for bad files
            size = self.pre.image_size
            return torch.zeros((size, size, 3), dtype=torch.uint8), f"{type(exc).__name__}: {exc}"


def load_image(path, pre: PreprocessConfig, resize: bool = True) -> np.ndarray:
    """Decode one file to RGB uint8 (H, W, 3) and, unless told not to, resize it as ``pre`` says."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
    if not resize:
        return np.asarray(image, dtype=np.uint8).copy()
    size = pre.image_size
    if pre.resize == "stretch":
        image = image.resize((size, size), Image.BILINEAR)
    else:
        w, h = image.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).copy()


def _collate(batch):
    import torch

    return torch.stack([img for img, _ in batch]), [err for _, err in batch]


def uint8_batches(split: Split, start: int, cfg: ExtractConfig, batch_size: int, device):
    """Yield ``(row, uint8 NHWC batch on device)`` from row ``start`` to the end."""
    import torch

    pin = device.type == "cuda"
    if split.images is not None:
        for row in range(start, len(split), batch_size):
            batch = torch.from_numpy(split.images[row : row + batch_size])
            yield row, (batch.pin_memory() if pin else batch).to(device, non_blocking=pin)
        return
    loader = torch.utils.data.DataLoader(
        FileImages(split.files[start:], cfg.preprocess),
        batch_size=batch_size,
        num_workers=cfg.num_workers,
        collate_fn=_collate,
        pin_memory=pin,
    )
    row = start
    for batch, errors in loader:
        for offset, err in enumerate(errors):
            if err:
                raise FeatcacheError(f"cannot read image {split.files[row + offset]}: {err}")
        yield row, batch.to(device, non_blocking=pin)
        row += len(batch)


def extract(cfg: ExtractConfig, progress: bool = True, log=print) -> list[ExtractResult]:
    """Make sure a finished cache exists for every requested backbone; return where."""
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    key = dataset_key(cfg.data)
    dataset: Dataset | None = None
    results = []
    for name in cfg.backbones:
        spec = BACKBONES.lookup(name)
        started = time.perf_counter()
        fp = fingerprint(cfg, spec, precision)
        path = cache_file(cfg.cache_dir, key, name, fp)
        if _finished(path):
            results.append(ExtractResult(name, path, "cached", time.perf_counter() - started, 0))
            continue
        # Data and weights are loaded before anything is written, so their errors leave nothing behind.
        dataset = dataset or load_dataset(cfg.data)
        model = tap_model(spec, cfg.weights, cfg.data.seed, cfg.pooling, device)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FeatcacheError(f"cannot create cache folder {path.parent}: {exc.strerror}; choose another --cache-dir") from exc
        with locked(path, on_wait=lambda: log(f"waiting for another featcache process writing {path} ...")):
            if _finished(path):  # the other writer finished it while we waited
                results.append(ExtractResult(name, path, "cached", time.perf_counter() - started, 0))
                continue
            status, images = _write_cache(cfg, spec, fp, path, dataset, model, device, precision, progress, log)
        seconds = time.perf_counter() - started
        write_timing(path, {"seconds": seconds, "images": images, "status": status, "device": str(device),
                            "precision": precision, "batch_size": cfg.batch_size})
        results.append(ExtractResult(name, path, status, seconds, images))
    return results


def _finished(path: Path) -> bool:
    if not path.exists():
        return False
    with FeatureCache(path):  # raises a clear error for a corrupt or foreign file
        return True


def _write_cache(cfg, spec, fp, path, dataset, model, device, precision, progress, log) -> tuple[str, int]:
    import torch
    from tqdm import tqdm

    tap_dims = {t.node: pooled_dim(t.channels, cfg.pooling) for t in spec.taps}
    run = {"batch_size": cfg.batch_size, "compile": cfg.compile}
    writer = CacheWriter(
        path, fp, {s: (d.labels, d.index) for s, d in dataset.splits.items()}, tap_dims, cfg.dtype, dataset.classes, run
    )
    if writer.resumed and writer.run_attrs != run:
        log(f"resuming {writer.partial} with its original settings {writer.run_attrs} so the numbers match")
    run = writer.run_attrs
    storage = torch.float16 if cfg.dtype == "float16" else torch.float32
    warned: set[str] = set()
    try:
        if run["compile"]:
            model = compiled(model)
        todo = {s: len(d) - writer.rows_done(s) for s, d in dataset.splits.items()}
        bar = tqdm(total=sum(todo.values()), unit="img", desc=spec.name, disable=not progress, leave=False)
        with bar, torch.inference_mode():
            for split_name, split in dataset.splits.items():
                batches = uint8_batches(split, writer.rows_done(split_name), cfg, run["batch_size"], device)
                for row, images in batches:
                    with autocast(device, precision):
                        pooled = model(to_input(images, cfg.preprocess))
                    features = {}
                    for tap, values in pooled.items():
                        if storage == torch.float16 and tap not in warned:
                            largest = float(values.abs().max())
                            if 0 < largest < FLOAT16_TINY:
                                warned.add(tap)
                                log(f"warning: {spec.name}/{tap} values are below float16's normal range (largest "
                                    f"{largest:.2g}); they are stored as zeros or with lost precision: use --dtype float32")
                        values = values.to(storage)
                        if not torch.isfinite(values).all():
                            raise FeatcacheError(
                                f"features of {spec.name}/{tap} overflow {cfg.dtype}: use --dtype float32"
                            )
                        features[tap] = values.cpu().numpy()
                    writer.write(split_name, row, features)
                    bar.update(len(images))
    except FeatcacheError:
        writer.close()  # the same input would fail again: leave nothing behind
        writer.partial.unlink(missing_ok=True)
        raise
    except BaseException:
        writer.close()  # interrupted: keep the partial file for a resume
        raise
    status = "resumed" if writer.resumed else "extracted"
    writer.finish()
    return status, sum(todo.values())
