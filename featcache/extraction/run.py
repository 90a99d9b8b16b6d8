"""Stage 3 (extraction): one forward pass per batch, every tap pooled, streamed to the HDF5 store.

Flow: data -> backbones -> **extraction.run** (one shared pass: passes) -> store. In-memory images (CIFAR-10, digits)
travel to the device as uint8 batches and are resized and normalised there; image files
are decoded and resized by DataLoader workers. The network is prepared once for
inference (conv+BN folded, channels_last, optional ``torch.compile``) and runs under
``inference_mode`` with autocast where the precision asks for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from featcache.device import emulated, resolve_precision
from featcache.backbones.taps import tap_model
from featcache.data.datasets import Dataset, load_dataset
from featcache.data.images import BadImage, open_rgb
from featcache.errors import FeatcacheError
from featcache import torchrun
from featcache.extraction import distributed
from featcache.extraction.config import ExtractConfig, cache_identities, preprocess_for
from featcache.extraction.passes import Job, Member, one_pass, rates
from featcache.extraction.reader import FeatureCache
from featcache.extraction.store import CacheWriter, locked, write_timing


@dataclass(frozen=True)
class ExtractResult:
    backbone: str
    path: Path
    status: str  # "cached", "extracted" or "resumed"
    seconds: float
    images: int
    skipped: tuple[dict, ...] = ()  # unreadable images left out (--skip-bad-images)
    timings: dict = field(default_factory=dict)  # seconds per phase: setup, data, first batch, network, writes
    precision: str = ""  # what the network ran at: fp32, bf16 or fp16 (--precision auto resolved)


def extract(cfg: ExtractConfig, progress: bool = True, log=print) -> list[ExtractResult]:
    """Make sure a finished cache exists for every requested backbone; return where.

    The backbones that are not cached yet share one pass over the data: each batch is
    read and decoded once and goes through every one of them. Under ``torchrun`` every
    rank extracts its shard and rank 0 assembles the cache.
    """
    r = torchrun.current()
    torchrun.init(r)
    device = torchrun.device_for(r, cfg.device)
    precision = resolve_precision(cfg.precision, device)
    say = log if r.main else (lambda message: None)
    if warning := emulated(cfg.precision, device):
        say(warning)
    results: dict[str, ExtractResult] = {}
    todo = []
    started = time.perf_counter()
    for name, cache in cache_identities(cfg, precision).items():
        hit = torchrun.agree(r, _served(name, cache.path, started, cache.fingerprint))
        if hit is not None:
            results[name] = hit
        else:
            todo.append((cache.spec, cache.fingerprint, cache.path))
    if todo:
        # Data and weights are loaded before anything is written, so their errors leave nothing behind.
        tick = time.perf_counter()
        dataset = _load_once(cfg, r, log)
        jobs = [Job(dataclasses.replace(cfg, preprocess=preprocess_for(cfg, spec)), spec, fp, path, dataset,
                    tap_model(spec, cfg.weights, cfg.data.seed, cfg.pooling, device),
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
    out = [dataclasses.replace(results[name], precision=precision) for name in cfg.backbones]
    for result in out:  # said here, so that fuse-train --extract and sweep --extract say it too
        if result.skipped:
            say(f"{result.backbone}: skipped {len(result.skipped)} unreadable image(s), recorded in the cache "
                f"(featcache info lists them):")
            for item in result.skipped:
                say(f"  {item['error']}")
    return out


def _extract_locked(jobs: list[Job], started: float) -> dict[str, ExtractResult]:
    """Each backbone's cache under its lock; those another process finished meanwhile are served."""
    out: dict[str, ExtractResult] = {}
    with contextlib.ExitStack() as locks:
        missing = []
        # Locks are taken in one global order (by path): two commands naming the same backbones
        # in different orders would otherwise each hold one lock and wait for the other's.
        for job in sorted(jobs, key=lambda j: str(j.path)):
            locks.enter_context(locked(job.path, on_wait=lambda p=job.path: job.log(
                f"waiting for another featcache process writing {p} ...")))
            hit = _served(job.spec.name, job.path, started, job.fp)  # the other writer may have finished it while we waited
            if hit is not None:
                out[job.spec.name] = hit
            else:
                missing.append(job)
        for job, (status, images, skipped, clock) in zip(missing, _write_caches(missing, [j.path for j in missing])):
            out[job.spec.name] = ExtractResult(job.spec.name, job.path, status, time.perf_counter() - started,
                                               images, tuple(skipped), clock)
    return out


def _load_once(cfg: ExtractConfig, r, log) -> Dataset:
    """The dataset; under torchrun rank 0 loads (and downloads) first, then the others."""
    if r.world > 1 and not r.main:
        torchrun.barrier(r)
    dataset = load_dataset(cfg.data)
    if r.world > 1 and r.main:
        torchrun.barrier(r)
    for note in dataset.notes if r.main else ():
        log(f"warning: {note}")
    return dataset


def _served(name: str, path: Path, started: float, expected: dict) -> ExtractResult | None:
    """The cache hit at ``path``, or None; a corrupt file there, or another request's, is a clear error."""
    if not path.exists():
        return None
    with FeatureCache(path, expected=expected) as cache:
        skipped = tuple(cache.skipped)
    return ExtractResult(name, path, "cached", time.perf_counter() - started, 0, skipped)


def _extract_sharded(jobs: list[Job], r) -> dict[str, ExtractResult]:
    """This rank's shard of every backbone into its own files; then rank 0 copies the shards into the caches."""
    started = time.perf_counter()
    world = [torchrun.Ranks(k, r.world) for k in range(r.world)]
    dataset, batch_size = jobs[0].dataset, jobs[0].cfg.batch_size
    rows_of = [{s: distributed.shard_rows(len(d), batch_size, k) for s, d in dataset.splits.items()} for k in world]
    shards = {job.spec.name: [distributed.shard_file(job.path, k) for k in world] for job in jobs}
    written = _write_caches(jobs, [shards[job.spec.name][r.rank] for job in jobs], rows_of[r.rank])
    out = {}
    for job, (_, images, _, clock) in zip(jobs, written):
        images = torchrun.total(r, images)  # also the barrier: every shard is finished
        skipped: list[dict] = []
        if r.main:
            with locked(job.path):
                writer = CacheWriter(job.path, job.fp, {s: _rows(d) for s, d in dataset.splits.items()},
                                     job.tap_dims, job.cfg.dtype, dataset.classes, job.run)
                distributed.merge(writer, list(zip(shards[job.spec.name], rows_of)), batch_size)
                skipped = _skipped(writer, dataset)
                writer.finish(skipped)
            distributed.remove_shards(shards[job.spec.name])
        out[job.spec.name] = ExtractResult(job.spec.name, job.path, "extracted", time.perf_counter() - started,
                                           images, tuple(skipped), clock)
    torchrun.barrier(r)  # the caches are in place
    return out


def _write_caches(jobs: list[Job], paths: list[Path], rows: dict[str, tuple[int, int]] | None = None):
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
                path, job.fp, {s: _rows(d, slice(*rows[s])) for s, d in dataset.splits.items()},
                job.tap_dims, job.cfg.dtype, dataset.classes, job.run,
            ))
            if writers[-1].resumed and writers[-1].run_attrs != job.run:
                job.log(f"resuming {writers[-1].partial} with its original settings {writers[-1].run_attrs} "
                        f"so the numbers match")
        passes: dict[tuple, list] = {}
        in_memory = all(split.images is not None for split in dataset.splits.values())
        for job, writer in zip(jobs, writers):
            # Files are decoded and fitted to one input size per pass; in-memory images are resized per backbone.
            key = (writer.run_attrs["batch_size"], None if in_memory else job.cfg.preprocess)
            passes.setdefault(key, []).append(Member(job, writer, rows))
        clocks = {}
        for (batch_size, _), members in passes.items():
            clock = one_pass(members, dataset, rows, batch_size)
            images = sum(stop - m.first[s] for m in members for s, (_, stop) in rows.items()) // len(members)
            if members[0].job.progress and images:
                members[0].job.log(f"{'+'.join(m.job.spec.name for m in members)}: {rates(clock, images)}")
            clocks.update({id(m.job): clock for m in members})
        for writer in writers:  # the batches the writers still hold reach the file here, where a failure cleans up
            writer.commit()
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


def _rows(split, rows: slice = slice(None)) -> tuple:
    """What a cache file holds of a split's rows besides features: labels, source index, official validation."""
    return split.labels[rows], split.index[rows], None if split.official_val is None else split.official_val[rows]


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
