"""One pass over the data for every backbone that still needs it: batches in, features to the writers.

Inside the extraction stage (extraction.run -> **passes** -> store). Each batch is read and
decoded once, resized per preprocessing, sent through every backbone; results come back one
batch behind (the GPU never waits for the host) and a writer thread stores them.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.backbones.registry import BackboneSpec
from featcache.device import autocast, compiled
from featcache.data.datasets import Dataset, Split
from featcache.data.device_decode import FileBytes, decode_batch
from featcache.data.images import FileImages
from featcache.data.preprocess import to_input
from featcache.errors import FeatcacheError
from featcache.extraction.config import ExtractConfig, workers_for
from featcache.extraction.reader import FLOAT16_TINY
from featcache.extraction.store import CacheWriter

# Decode JPEGs on the device (bytes from the workers, torchvision's batched decode_jpeg): by default on a
# GPU. Tests set it True to run that path on the CPU.
DEVICE_JPEG_DECODE: bool | None = None


def _collate(batch):
    """Per-file items are stacked here (in the worker); a ``FileBytes`` batch arrives whole from ``__getitems__``."""
    import torch

    if isinstance(batch, tuple):
        return batch
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
    on_device = DEVICE_JPEG_DECODE if DEVICE_JPEG_DECODE is not None else device.type == "cuda"
    files = split.files[start:stop]
    loader = torch.utils.data.DataLoader(
        (FileBytes if on_device else FileImages)(files, cfg.preprocess),
        batch_size=batch_size,
        num_workers=workers_for(device, cfg.num_workers),
        collate_fn=_collate,
        pin_memory=pin and not on_device,
    )
    row = start
    for batch, errors in loader:
        if on_device:  # JPEG bytes decoded by the device in one call, then resized there
            batch, errors = decode_batch(batch, errors, files[row - start : row - start + len(errors)],
                                         cfg.preprocess, device)
        yield row, batch.to(device, non_blocking=pin), errors
        row += len(batch)


class Clock(dict):
    """Seconds spent per phase of the extraction loop: ``with clock("data"): ...``."""

    @contextlib.contextmanager
    def __call__(self, phase: str):
        tick = time.perf_counter()
        try:
            yield
        finally:
            self[phase] = self.get(phase, 0.0) + time.perf_counter() - tick


class Member:
    """One backbone in a shared pass: its prepared model, its writer, and the batches in flight."""

    def __init__(self, job: Job, writer: CacheWriter, rows):
        self.job, self.writer = job, writer
        self.model = compiled(job.model) if writer.run_attrs["compile"] else job.model
        self.first = {s: start + writer.rows_done(s) for s, (start, _) in rows.items()}
        self.taps = list(job.tap_dims)
        self.dims = list(job.tap_dims.values())
        self.warm = False
        self.scales: dict[str, list[float]] = {}  # split -> each tap's storage scale (float16: store.storage_scale)

    def launch(self, x, split: str, row: int, start: int, bad, clock: Clock):
        """Queue one batch on the device; the features are fetched later by :meth:`land`.

        The storage dtype conversion and the range checks run on the device too, so the host
        receives one array of stored values and one small array of statistics per batch.
        """
        import torch

        # The first batch pays one-off costs (kernel loading, algorithm choice): timed apart.
        with clock("network" if self.warm else "first batch"), autocast(self.job.device, self.job.precision):
            pooled = self.model(x)
            parts = [pooled[t].float() for t in self.taps]
            if self.job.cfg.dtype == "float16":
                parts = self._scaled(split, parts)
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

    def _scaled(self, split: str, parts: list) -> list:
        """``parts`` multiplied by their taps' storage scales; a split's first batch decides them (one wait for the
        device, once per split), or the file's, when it resumes."""
        import torch

        if split not in self.scales:
            largest = torch.stack([p.abs().amax() for p in parts]).cpu().tolist()
            self.scales[split] = [self.writer.scale_for(split, t, m) for t, m in zip(self.taps, largest)]
        return [p if s == 1.0 else p * s for p, s in zip(parts, self.scales[split])]

    def land(self, split: str, offset: int, bad, fetched, event, clock: Clock, writes) -> int:
        """Wait for a queued batch and hand it to the writer thread; returns its rows."""
        with clock("network"):
            if event is not None:
                event.synchronize()
        writes.submit(self._store, split, offset, bad, fetched, clock)
        return len(fetched[0])

    def _store(self, split: str, offset: int, bad, fetched, clock: Clock) -> None:
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


class WriterThread:
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


def one_pass(members: list[Member], dataset: Dataset, rows, batch_size: int) -> Clock:
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
    clock = Clock()
    bar = tqdm(total=total, unit="img", desc=names, disable=not lead.progress, leave=False)
    with clock("pass"), bar, torch.inference_mode(), WriterThread() as writes:
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


def rates(clock: Clock, images: int) -> str:
    """'data 9,000 img/s · network 4,000 img/s · writes ...': which part of the loop limits."""
    parts = [f"{phase} {images / seconds:,.0f} img/s" for phase in ("data", "network", "writes")
             if (seconds := clock.get(phase, 0.0)) > 0]
    if "first batch" in clock:
        parts.append(f"first batch {clock['first batch']:.2f} s")
    return " · ".join(parts)


def _check_range(job: Job, tap: str, largest: float, finite: bool) -> None:
    """Warn once per tap about values below float16's normal range; refuse values that overflow storage."""
    if job.cfg.dtype == "float16" and tap not in job.warned and 0 < largest < FLOAT16_TINY:
        job.warned.add(tap)
        job.log(f"warning: {job.spec.name}/{tap} values are below float16's normal range (largest "
                f"{largest:.2g}); they are stored as zeros or with lost precision: use --dtype float32")
    if not finite:
        raise FeatcacheError(f"features of {job.spec.name}/{tap} overflow {job.cfg.dtype}: use --dtype float32")


@dataclass(frozen=True)
class Job:
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
        return {t.node: t.width(self.cfg.pooling) for t in self.spec.taps}

    @property
    def run(self) -> dict:
        return {"batch_size": self.cfg.batch_size, "compile": self.cfg.compile}
