"""Stage 1: one forward pass per batch, every tap pooled, streamed to the HDF5 store.

Flow: dataset -> backbone -> **extract** -> store. In-memory images (CIFAR-10, digits)
travel to the device as uint8 batches and are resized and normalised there; image files
are decoded and resized by DataLoader workers. The network is prepared once for
inference (conv+BN folded, channels_last, optional ``torch.compile``) and runs under
``inference_mode`` with autocast where the precision asks for it.
"""

from __future__ import annotations

import contextlib
import functools
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
    timings: dict = field(default_factory=dict)  # seconds per phase: setup, data, first batch, network, writes


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
    mean, std = _mean_std(tuple(pre.mean), tuple(pre.std), x.device)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=16)
def _mean_std(mean: tuple, std: tuple, device):
    """Normalisation constants on the device, made once: a fresh host-to-GPU copy per batch would sync."""
    import torch

    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


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

    The backbones that are not cached yet share one pass over the data: each batch is
    read and decoded once and goes through every one of them. Under ``torchrun`` every
    rank extracts its shard and rank 0 assembles the cache.
    """
    r = distributed.ranks()
    distributed.init(r)
    device = distributed.device_for(r, cfg.device)
    precision = resolve_precision(cfg.precision, device)
    key = dataset_key(cfg.data)
    say = log if r.main else (lambda message: None)
    results: dict[str, ExtractResult] = {}
    todo = []
    started = time.perf_counter()
    for name in cfg.backbones:
        spec = BACKBONES.lookup(name)
        fp = fingerprint(cfg, spec, precision)
        path = cache_file(cfg.cache_dir, key, name, fp)
        hit = distributed.agree(r, _served(name, path, started))
        if hit is not None:
            results[name] = hit
        else:
            todo.append((spec, fp, path))
    if todo:
        # Data and weights are loaded before anything is written, so their errors leave nothing behind.
        tick = time.perf_counter()
        dataset = _load_once(cfg, r)
        jobs = [_Job(cfg, spec, fp, path, dataset, tap_model(spec, cfg.weights, cfg.data.seed, cfg.pooling, device),
                     device, precision, progress and r.main, say) for spec, fp, path in todo]
        setup = time.perf_counter() - tick
        for job in jobs:
            try:
                job.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise FeatcacheError(f"cannot create cache folder {job.path.parent}: {exc.strerror}; "
                                     f"choose another --cache-dir") from exc
        done = _extract_sharded(jobs, r) if r.world > 1 else _extract_locked(jobs, started)
        for job in jobs:
            result = done[job.spec.name]
            if result.status != "cached":
                result.timings.update(setup=setup)
                if r.main:
                    write_timing(job.path, {"seconds": result.seconds, "images": result.images, "status": result.status,
                                            "device": str(device), "precision": precision,
                                            "batch_size": cfg.batch_size, "processes": r.world,
                                            "shared_pass": [j.spec.name for j in jobs], "phases": result.timings})
            results[job.spec.name] = result
    return [results[name] for name in cfg.backbones]


def _extract_locked(jobs: list[_Job], started: float) -> dict[str, ExtractResult]:
    """Each backbone's cache under its lock; those another process finished meanwhile are served."""
    out: dict[str, ExtractResult] = {}
    with contextlib.ExitStack() as locks:
        missing = []
        for job in jobs:
            locks.enter_context(locked(job.path, on_wait=lambda p=job.path: job.log(
                f"waiting for another featcache process writing {p} ...")))
            hit = _served(job.spec.name, job.path, started)  # the other writer may have finished it while we waited
            if hit is not None:
                out[job.spec.name] = hit
            else:
                missing.append(job)
        for job, (status, images, skipped, clock) in zip(missing, _write_caches(missing, [j.path for j in missing])):
            out[job.spec.name] = ExtractResult(job.spec.name, job.path, status, time.perf_counter() - started,
                                               images, tuple(skipped), clock)
    return out


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


def _extract_sharded(jobs: list[_Job], r) -> dict[str, ExtractResult]:
    """This rank's shard of every backbone into its own files; then rank 0 copies the shards into the caches."""
    started = time.perf_counter()
    world = [distributed.Ranks(k, r.world) for k in range(r.world)]
    dataset, batch_size = jobs[0].dataset, jobs[0].cfg.batch_size
    rows_of = [{s: distributed.shard_rows(len(d), batch_size, k) for s, d in dataset.splits.items()} for k in world]
    shards = {job.spec.name: [distributed.shard_file(job.path, k) for k in world] for job in jobs}
    written = _write_caches(jobs, [shards[job.spec.name][r.rank] for job in jobs], rows_of[r.rank])
    out = {}
    for job, (_, images, _, clock) in zip(jobs, written):
        images = distributed.total(r, images)  # also the barrier: every shard is finished
        skipped: list[dict] = []
        if r.main:
            with locked(job.path):
                writer = CacheWriter(job.path, job.fp, {s: (d.labels, d.index) for s, d in dataset.splits.items()},
                                     job.tap_dims, job.cfg.dtype, dataset.classes, job.run)
                distributed.merge(writer, list(zip(shards[job.spec.name], rows_of)), batch_size)
                skipped = _skipped(writer, dataset)
                writer.finish(skipped)
            distributed.remove_shards(shards[job.spec.name])
        out[job.spec.name] = ExtractResult(job.spec.name, job.path, "extracted", time.perf_counter() - started,
                                           images, tuple(skipped), clock)
    distributed.barrier(r)  # the caches are in place
    return out


def _write_caches(jobs: list[_Job], paths: list[Path], rows: dict[str, tuple[int, int]] | None = None):
    """Extract rows ``rows[split] = (start, stop)`` (default: all) of every job into its file at ``paths``.

    Jobs whose partial files were written with the same batch size share one pass over the
    data; a partial file resumed with other settings gets a pass of its own. Returns
    ``(status, images, skipped)`` per job, in order.
    """
    if not jobs:
        return []
    dataset = jobs[0].dataset
    rows = rows or {s: (0, len(d)) for s, d in dataset.splits.items()}
    writers = []
    try:
        for job, path in zip(jobs, paths):
            writers.append(CacheWriter(
                path, job.fp, {s: (d.labels[slice(*rows[s])], d.index[slice(*rows[s])]) for s, d in dataset.splits.items()},
                job.tap_dims, job.cfg.dtype, dataset.classes, job.run,
            ))
            if writers[-1].resumed and writers[-1].run_attrs != job.run:
                job.log(f"resuming {writers[-1].partial} with its original settings {writers[-1].run_attrs} "
                        f"so the numbers match")
        passes: dict[int, list] = {}
        for job, writer in zip(jobs, writers):
            passes.setdefault(writer.run_attrs["batch_size"], []).append(_Member(job, writer, rows))
        clocks = {}
        for batch_size, members in passes.items():
            clock = _one_pass(members, dataset, rows, batch_size)
            images = sum(stop - m.first[s] for m in members for s, (_, stop) in rows.items()) // len(members)
            if members[0].job.progress and images:
                members[0].job.log(f"{'+'.join(m.job.spec.name for m in members)}: {_rates(clock, images)}")
            clocks.update({id(m.job): clock for m in members})
    except FeatcacheError:
        for writer in writers:  # the same input would fail again: leave nothing behind
            writer.close()
            writer.partial.unlink(missing_ok=True)
        raise
    except BaseException:
        for writer in writers:  # interrupted: keep the partial files for a resume
            writer.close()
        raise
    out = []
    for job, writer in zip(jobs, writers):
        todo = sum(stop - start for start, stop in rows.values()) - writer.done_at_open
        skipped = _skipped(writer, dataset, rows)
        writer.finish(skipped)
        out.append(("resumed" if writer.resumed else "extracted", todo, skipped, dict(clocks.get(id(job), {}))))
    return out


class _Clock(dict):
    """Seconds spent per phase of the extraction loop: ``with clock("data"): ...``."""

    @contextlib.contextmanager
    def __call__(self, phase: str):
        tick = time.perf_counter()
        try:
            yield
        finally:
            self[phase] = self.get(phase, 0.0) + time.perf_counter() - tick


class _Member:
    """One backbone in a shared pass: its prepared model, its writer, and the batches in flight."""

    def __init__(self, job: _Job, writer: CacheWriter, rows):
        self.job, self.writer = job, writer
        self.model = compiled(job.model) if writer.run_attrs["compile"] else job.model
        self.first = {s: start + writer.rows_done(s) for s, (start, _) in rows.items()}
        self.taps = list(job.tap_dims)
        self.dims = list(job.tap_dims.values())
        self.warm = False

    def launch(self, x, split: str, row: int, start: int, bad, clock: _Clock):
        """Queue one batch on the device; the features are fetched later by :meth:`land`.

        The storage dtype conversion and the range checks run on the device too, so the host
        receives one array of stored values and one small array of statistics per batch.
        """
        import torch

        # The first batch pays one-off costs (kernel loading, algorithm choice): timed apart.
        with clock("network" if self.warm else "first batch"), autocast(self.job.device, self.job.precision):
            pooled = self.model(x)
            parts = [pooled[t].float() for t in self.taps]
            flat = torch.cat(parts, dim=1).to(torch.float16 if self.job.cfg.dtype == "float16" else torch.float32)
            # per tap: largest |value| before storage (float16 underflow), then per column: all stored values finite
            stats = torch.cat([torch.stack([p.abs().amax() for p in parts]), torch.isfinite(flat).all(dim=0).float()])
            if flat.device.type != "cuda":
                fetched, event = (flat, stats), None
            else:
                fetched = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (flat, stats))
                for host, device_tensor in zip(fetched, (flat, stats)):
                    host.copy_(device_tensor, non_blocking=True)  # lands while the next batch runs
                event = torch.cuda.Event()
                event.record()
        self.warm = True
        return self, split, row - start, bad, fetched, event

    def land(self, split: str, offset: int, bad, fetched, event, clock: _Clock, writes) -> int:
        """Wait for a queued batch and hand it to the writer thread; returns its rows."""
        with clock("network"):
            if event is not None:
                event.synchronize()
        writes.submit(self._store, split, offset, bad, fetched, clock)
        return len(fetched[0])

    def _store(self, split: str, offset: int, bad, fetched, clock: _Clock) -> None:
        """Check one batch's values and write them to the cache (in the writer thread)."""
        with clock("writes"):
            values, stats = (t.numpy() for t in fetched)
            largest, finite = stats[: len(self.taps)], stats[len(self.taps) :]
            features, col = {}, 0
            for k, (tap, dim) in enumerate(zip(self.taps, self.dims)):
                _check_range(self.job, tap, float(largest[k]), bool(finite[col : col + dim].all()))
                features[tap] = np.ascontiguousarray(values[:, col : col + dim])
                col += dim
            self.writer.write(split, offset, features, skipped=bad)


class _WriterThread:
    """HDF5 writes in one background thread, in submission order, at most ``depth`` batches behind.

    The GPU and the data pipeline keep going while a batch is written; a failed write is
    raised in the caller at the next submit or at :meth:`finish`.
    """

    def __init__(self, depth: int = 4):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featcache-writes")
        self.pending: list = []
        self.depth = depth

    def submit(self, fn, *args) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > self.depth or (self.pending and self.pending[0].done()):
            self.pending.pop(0).result()

    def finish(self) -> None:
        while self.pending:
            self.pending.pop(0).result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(wait=True)  # an interrupted pass still completes the writes it started


def _one_pass(members: list[_Member], dataset: Dataset, rows, batch_size: int) -> _Clock:
    """Every batch read once and sent through every member that still needs it.

    On a GPU the host stays one batch behind: batch i+1 is queued before the features of
    batch i are fetched, and a writer thread stores them, so the device does not wait for HDF5.
    """
    import torch
    from tqdm.auto import tqdm

    lead = members[0].job
    cfg, device = lead.cfg, lead.device
    total = sum(stop - m.first[s] for m in members for s, (_, stop) in rows.items())
    names = "+".join(m.job.spec.name for m in members)
    clock = _Clock()
    bar = tqdm(total=total, unit="img", desc=names, disable=not lead.progress, leave=False)
    with clock("pass"), bar, torch.inference_mode(), _WriterThread() as writes:
        for split_name, split in dataset.splits.items():
            start, stop = rows[split_name]
            batches = uint8_batches(split, min(m.first[split_name] for m in members), stop, cfg, batch_size, device)
            in_flight: list = []
            while True:
                with clock("data"):
                    item = next(batches, None)
                if item is None:
                    break
                row, images, errors = item
                bad = np.array([bool(e) for e in errors])
                if bad.any() and not cfg.skip_bad_images:
                    raise FeatcacheError(f"{errors[int(np.argmax(bad))]}: fix or remove the file, or pass "
                                         f"--skip-bad-images to leave unreadable images out")
                inputs: dict = {}  # one resize/normalise per distinct preprocessing
                queued = []
                for m in members:
                    if row >= m.first[split_name]:
                        pre = m.job.cfg.preprocess
                        if pre not in inputs:
                            with clock("data"):
                                inputs[pre] = to_input(images, pre)
                        queued.append(m.launch(inputs[pre], split_name, row, start, bad, clock))
                for member, *args in in_flight:
                    bar.update(member.land(*args, clock, writes))
                in_flight = queued
            for member, *args in in_flight:
                bar.update(member.land(*args, clock, writes))
        writes.finish()
    return clock


def _rates(clock: _Clock, images: int) -> str:
    """'data 9,000 img/s · network 4,000 img/s · writes ...': which part of the loop limits."""
    parts = [f"{phase} {images / seconds:,.0f} img/s" for phase in ("data", "network", "writes")
             if (seconds := clock.get(phase, 0.0)) > 0]
    if "first batch" in clock:
        parts.append(f"first batch {clock['first batch']:.2f} s")
    return " · ".join(parts)


def _check_range(job: _Job, tap: str, largest: float, finite: bool) -> None:
    """Warn once per tap about values below float16's normal range; refuse values that overflow storage."""
    if job.cfg.dtype == "float16" and tap not in job.warned and 0 < largest < FLOAT16_TINY:
        job.warned.add(tap)
        job.log(f"warning: {job.spec.name}/{tap} values are below float16's normal range (largest "
                f"{largest:.2g}); they are stored as zeros or with lost precision: use --dtype float32")
    if not finite:
        raise FeatcacheError(f"features of {job.spec.name}/{tap} overflow {job.cfg.dtype}: use --dtype float32")


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
