"""Stage 1: one forward pass per batch, every tap pooled, streamed to the HDF5 store.

Flow: dataset -> backbone -> **extract** -> store. In-memory images (CIFAR-10, digits)
travel to the device as uint8 batches and are resized and normalised there; image files
are decoded and resized by DataLoader workers. The network is prepared once for
inference (conv+BN folded, channels_last, optional ``torch.compile``) and runs under
``inference_mode`` with autocast where the precision asks for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.backbones import BACKBONES, BackboneSpec, build_backbone
from featcache import distributed
from featcache.config import ExtractConfig, PreprocessConfig, fingerprint, resolve_precision
from featcache.datasets import Dataset, Split, dataset_key, load_dataset
from featcache.errors import FeatcacheError
from featcache.images import BadImage, FileImages, load_image, open_rgb  # noqa: F401  (load_image: re-exported)
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
    skipped: tuple[dict, ...] = ()  # unreadable images left out (--skip-bad-images)


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


def _collate(batch):
    import torch

    return torch.stack([img for img, _ in batch]), [err for _, err in batch]


def uint8_batches(split: Split, start: int, stop: int, cfg: ExtractConfig, batch_size: int, device):
    """Yield ``(row, uint8 NHWC batch on device, errors)`` for rows ``start:stop``.

    ``errors`` holds one message per image, empty for those that decoded.
    """
    import torch

    pin = device.type == "cuda"
    if split.images is not None:
        for row in range(start, stop, batch_size):
            batch = torch.from_numpy(split.images[row : min(row + batch_size, stop)])
            yield row, (batch.pin_memory() if pin else batch).to(device, non_blocking=pin), [""] * len(batch)
        return
    loader = torch.utils.data.DataLoader(
        FileImages(split.files[start:stop], cfg.preprocess),
        batch_size=batch_size,
        num_workers=cfg.num_workers,
        collate_fn=_collate,
        pin_memory=pin,
    )
    row = start
    for batch, errors in loader:
        yield row, batch.to(device, non_blocking=pin), errors
        row += len(batch)


def extract(cfg: ExtractConfig, progress: bool = True, log=print) -> list[ExtractResult]:
    """Make sure a finished cache exists for every requested backbone; return where.

    Under ``torchrun`` every rank extracts its shard and rank 0 assembles the cache.
    """
    r = distributed.ranks()
    distributed.init(r)
    device = distributed.device_for(r, cfg.device)
    precision = resolve_precision(cfg.precision, device)
    key = dataset_key(cfg.data)
    say = log if r.main else (lambda message: None)
    dataset: Dataset | None = None
    results = []
    for name in cfg.backbones:
        spec = BACKBONES.lookup(name)
        started = time.perf_counter()
        fp = fingerprint(cfg, spec, precision)
        path = cache_file(cfg.cache_dir, key, name, fp)
        hit = distributed.agree(r, _served(name, path, started))
        if hit is not None:
            results.append(hit)
            continue
        # Data and weights are loaded before anything is written, so their errors leave nothing behind.
        if dataset is None:
            dataset = _load_once(cfg, r)
        model = tap_model(spec, cfg.weights, cfg.data.seed, cfg.pooling, device)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FeatcacheError(f"cannot create cache folder {path.parent}: {exc.strerror}; choose another --cache-dir") from exc
        job = _Job(cfg, spec, fp, path, dataset, model, device, precision, progress and r.main, say)
        if r.world > 1:
            status, images, skipped = _extract_sharded(job, r)
        else:
            with locked(path, on_wait=lambda p=path: say(f"waiting for another featcache process writing {p} ...")):
                hit = _served(name, path, started)  # the other writer may have finished it while we waited
                if hit is not None:
                    results.append(hit)
                    continue
                status, images, skipped = _write_cache(job, path)
        seconds = time.perf_counter() - started
        if r.main:
            write_timing(path, {"seconds": seconds, "images": images, "status": status, "device": str(device),
                                "precision": precision, "batch_size": cfg.batch_size, "processes": r.world})
        results.append(ExtractResult(name, path, status, seconds, images, tuple(skipped)))
    return results


def _load_once(cfg: ExtractConfig, r) -> Dataset:
    """The dataset; under torchrun rank 0 loads (and downloads) first, then the others."""
    if r.world > 1 and not r.main:
        distributed.barrier(r)
    dataset = load_dataset(cfg.data)
    if r.world > 1 and r.main:
        distributed.barrier(r)
    return dataset


def _served(name: str, path: Path, started: float) -> ExtractResult | None:
    """The cache hit at ``path``, or None; a corrupt or foreign file there is a clear error."""
    if not path.exists():
        return None
    with FeatureCache(path) as cache:
        skipped = tuple(cache.skipped)
    return ExtractResult(name, path, "cached", time.perf_counter() - started, 0, skipped)


@dataclass(frozen=True)
class _Job:
    """One backbone's extraction: everything the writing loop needs."""

    cfg: ExtractConfig
    spec: BackboneSpec
    fp: dict
    path: Path
    dataset: Dataset
    model: object
    device: object
    precision: str
    progress: bool
    log: object
    warned: set = field(default_factory=set)  # taps already warned about float16 underflow

    @property
    def tap_dims(self) -> dict[str, int]:
        return {t.node: pooled_dim(t.channels, self.cfg.pooling) for t in self.spec.taps}

    @property
    def run(self) -> dict:
        return {"batch_size": self.cfg.batch_size, "compile": self.cfg.compile}


def _extract_sharded(job: _Job, r) -> tuple[str, int, list[dict]]:
    """This rank's shard into its own file; then rank 0 copies every shard into the cache."""
    shard_paths = [distributed.shard_file(job.path, distributed.Ranks(k, r.world)) for k in range(r.world)]
    rows_of = [{s: distributed.shard_rows(len(d), job.cfg.batch_size, distributed.Ranks(k, r.world))
                for s, d in job.dataset.splits.items()} for k in range(r.world)]
    _, images, _ = _write_cache(job, shard_paths[r.rank], rows_of[r.rank])
    images = distributed.total(r, images)  # also the barrier: every shard is finished
    skipped: list[dict] = []
    if r.main:
        with locked(job.path):
            writer = CacheWriter(job.path, job.fp, {s: (d.labels, d.index) for s, d in job.dataset.splits.items()},
                                 job.tap_dims, job.cfg.dtype, job.dataset.classes, job.run)
            distributed.merge(writer, list(zip(shard_paths, rows_of)), job.cfg.batch_size)
            skipped = _skipped(writer, job.dataset)
            writer.finish(skipped)
        distributed.remove_shards(shard_paths)
    distributed.barrier(r)  # the cache is in place
    return "extracted", images, skipped


def _write_cache(job: _Job, path: Path, rows: dict[str, tuple[int, int]] | None = None) -> tuple[str, int, list[dict]]:
    """Extract rows ``rows[split] = (start, stop)`` (default: all) into the file at ``path``."""
    import torch
    from tqdm import tqdm

    cfg, dataset = job.cfg, job.dataset
    rows = rows or {s: (0, len(d)) for s, d in dataset.splits.items()}
    writer = CacheWriter(
        path, job.fp, {s: (d.labels[slice(*rows[s])], d.index[slice(*rows[s])]) for s, d in dataset.splits.items()},
        job.tap_dims, cfg.dtype, dataset.classes, job.run,
    )
    if writer.resumed and writer.run_attrs != job.run:
        job.log(f"resuming {writer.partial} with its original settings {writer.run_attrs} so the numbers match")
    run = writer.run_attrs
    model = job.model
    try:
        if run["compile"]:
            model = compiled(model)
        todo = {s: stop - start - writer.rows_done(s) for s, (start, stop) in rows.items()}
        bar = tqdm(total=sum(todo.values()), unit="img", desc=job.spec.name, disable=not job.progress, leave=False)
        with bar, torch.inference_mode():
            for split_name, split in dataset.splits.items():
                start, stop = rows[split_name]
                first = start + writer.rows_done(split_name)
                for row, images, errors in uint8_batches(split, first, stop, cfg, run["batch_size"], job.device):
                    bad = np.array([bool(e) for e in errors])
                    if bad.any() and not cfg.skip_bad_images:
                        raise FeatcacheError(f"{errors[int(np.argmax(bad))]}: fix or remove the file, or pass "
                                             f"--skip-bad-images to leave unreadable images out")
                    writer.write(split_name, row - start, _features(job, model, images), skipped=bad)
                    bar.update(len(images))
    except FeatcacheError:
        writer.close()  # the same input would fail again: leave nothing behind
        writer.partial.unlink(missing_ok=True)
        raise
    except BaseException:
        writer.close()  # interrupted: keep the partial file for a resume
        raise
    status = "resumed" if writer.resumed else "extracted"
    skipped = _skipped(writer, dataset, rows)
    writer.finish(skipped)
    return status, sum(todo.values()), skipped


def _features(job: _Job, model, images) -> dict[str, np.ndarray]:
    """One batch through the backbone: every tap pooled, in the storage dtype."""
    import torch

    storage = torch.float16 if job.cfg.dtype == "float16" else torch.float32
    with autocast(job.device, job.precision):
        pooled = model(to_input(images, job.cfg.preprocess))
    features = {}
    for tap, values in pooled.items():
        if storage == torch.float16 and tap not in job.warned:  # a device sync per tap: only until warned
            largest = float(values.abs().max())
            if 0 < largest < FLOAT16_TINY:
                job.warned.add(tap)
                job.log(f"warning: {job.spec.name}/{tap} values are below float16's normal range (largest "
                        f"{largest:.2g}); they are stored as zeros or with lost precision: use --dtype float32")
        values = values.to(storage)
        if not torch.isfinite(values).all():
            raise FeatcacheError(f"features of {job.spec.name}/{tap} overflow {job.cfg.dtype}: use --dtype float32")
        features[tap] = values.cpu().numpy()
    return features


def _skipped(writer, dataset: Dataset, rows: dict[str, tuple[int, int]] | None = None) -> list[dict]:
    """The unreadable images marked in the writer's file, each with the reason read again from the file."""
    out = []
    for name, split in dataset.splits.items():
        start = rows[name][0] if rows else 0
        for row in writer.skipped_rows(name):
            file = split.files[start + row]
            try:
                open_rgb(file)
                reason = "unreadable when extracted"
            except BadImage as exc:
                reason = str(exc)
            out.append({"split": name, "index": int(split.index[start + row]), "file": str(file), "error": reason})
    return out
