"""Finding and loading the cached taps fuse-train reads: by fingerprint, checked, loaded once.

Inside fuse (store -> **caches** -> fusion). The caches are found by the same fingerprint
``extract`` writes, so the same weights, image size and pooling flags pick the same files; a
missing one names the ``featcache extract`` command that makes it. A tap missing from its
cache, or dead (constant, or mostly below float16's range), is refused here.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from featcache.backbones.registry import BACKBONES
from featcache.backbones.weights import input_defaults
from featcache.data.datasets import DataRequest
from featcache.errors import FeatcacheError
from featcache.extraction.config import ExtractConfig, cache_identities
from featcache.extraction.reader import FeatureCache, float32
from featcache.fuse.fusion import TapRef


def extract_command(cfg: ExtractConfig, backbone: str) -> str:
    """The ``featcache extract`` command that makes ``backbone``'s cache for ``cfg``."""
    parts = ["featcache extract", f"--backbone {backbone}", f"--dataset {cfg.data.name}"]
    defaults = DataRequest()
    for f in fields(DataRequest):
        value = getattr(cfg.data, f.name)
        if f.name != "name" and value != getattr(defaults, f.name):
            flag = "--" + f.name.replace("_", "-")
            parts.append(flag if value is True else f"{flag} {value}")
    base = ExtractConfig()
    for name in ("weights", "pooling", "precision", "dtype", "device", "cache_dir"):
        if getattr(cfg, name) != getattr(base, name):
            parts.append(f"--{name.replace('_', '-')} {getattr(cfg, name)}")
    parts += cfg.preprocess.flags(skip=input_defaults(BACKBONES.lookup(cfg.backbones[0]), cfg.weights))
    return " ".join(parts)


def locate_caches(cfg: ExtractConfig) -> dict[str, Path]:
    """backbone -> finished cache file for this request; a missing one is an error."""
    found = {}
    for name, cache in cache_identities(cfg).items():
        path = cache.path
        if path.exists():
            FeatureCache(path, expected=cache.fingerprint).close()  # the request's own, and sound
        else:
            raise FeatcacheError(
                f"no cached features for {name} in {path.parent} with these settings: run "
                f"{extract_command(cfg, name)} (or add --extract)"
            )
        found[name] = path
    return found


@dataclass
class Features:
    """Every needed tap of both splits, loaded once."""

    classes: list[str]
    labels: dict[str, np.ndarray]  # split -> labels
    index: dict[str, np.ndarray]  # split -> position of each row in the source dataset
    taps: dict[tuple[str, TapRef], np.ndarray]  # (split, ref) -> (N, C) float32
    fingerprints: dict[str, dict]
    load_seconds: float
    official_val: np.ndarray | None = None  # bool per train row: the dataset's own validation split, if it has one


def shared_rows(caches: dict, path_of: dict) -> tuple[list[str], dict, dict]:
    """(classes, split -> labels, split -> source index), the same in every backbone's cache."""
    labels, index, classes = {}, {}, None
    for backbone, cache in caches.items():
        classes = classes or cache.classes
        for split in ("train", "test"):
            y = cache.labels(split)
            if split in labels and not np.array_equal(labels[split], y):
                raise FeatcacheError(f"{path_of[backbone]} holds other {split} rows than the other backbones' caches")
            labels[split], index[split] = y, cache.index(split)
    return classes, labels, index


def official_val(caches: dict) -> np.ndarray | None:
    """The train rows that are the dataset's own validation split (the same in every cache), or None."""
    return next(iter(caches.values())).official_val("train") if caches else None


def check_taps(caches: dict, path_of: dict, refs) -> None:
    for ref in sorted(refs):
        if ref.tap not in caches[ref.backbone].taps("train"):
            raise FeatcacheError(f"tap {ref} is not in {path_of[ref.backbone]}: re-run featcache extract "
                                 f"--backbone {ref.backbone}")


def check_alive(caches: dict, path_of: dict, refs, allow_dead, log, train: dict | None = None) -> set:
    """No tap is dead (constant, or mostly below float16's range) unless allowed; ``train``: rows already read.
    ``allow_dead="drop"`` (taps nobody named: ``--taps auto``): the dead ones are returned, to be left out."""
    dropped = set()
    for ref in sorted(refs):
        reason = caches[ref.backbone].dead(ref.tap, (train or {}).get(ref))
        if reason and allow_dead == "drop":
            log(f"note: tap {ref} is dead ({reason}): left out")
            dropped.add(ref)
        elif reason and allow_dead:
            log(f"warning: tap {ref} is dead ({reason}); used anyway (--allow-dead-taps)")
        elif reason:
            raise FeatcacheError(f"tap {ref} is dead in {path_of[ref.backbone]}: {reason}. A head learns nothing "
                                 f"from it: extract again with --dtype float32, choose other --taps, or pass "
                                 f"--allow-dead-taps to use it anyway")
    return dropped


def load_features(paths: dict[str, Path], refs: set[TapRef], allow_dead: bool | str = False, log=print) -> Features:
    """The taps ``refs`` of both splits, float32. A dead tap is refused, unless ``allow_dead`` (True: used, with a
    warning; "drop": left out of the result, with a note)."""
    started = time.perf_counter()
    taps = {}
    refs = set(refs)
    with contextlib.ExitStack() as stack:
        caches = {b: stack.enter_context(FeatureCache(p)) for b, p in paths.items()}
        classes, labels, index = shared_rows(caches, paths)
        official = official_val(caches)
        fps = {b: c.fingerprint for b, c in caches.items()}
        check_taps(caches, paths, refs)
        for split in ("train", "test"):
            for ref in refs:
                taps[(split, ref)] = finite(float32(caches[ref.backbone].read(split, ref.tap)), ref, split,
                                            paths[ref.backbone])
            if split == "train":  # checked on the rows just read, before the test split is read
                dropped = check_alive(caches, paths, refs, allow_dead, log, {ref: taps[("train", ref)] for ref in refs})
                refs -= dropped
                for ref in dropped:
                    del taps[("train", ref)]
    return Features(classes, labels, index, taps, fps, time.perf_counter() - started, official)


def finite(block: np.ndarray, ref, split: str, path: Path) -> np.ndarray:
    """``block``, unless it holds NaN or infinity (a damaged or tampered file): then one line naming the tap."""
    finite_mask = np.isfinite(block)
    if not finite_mask.all():
        rows = int(np.count_nonzero(~finite_mask.all(axis=1)))
        raise FeatcacheError(f"tap {ref} in {path} holds {block.size - int(np.count_nonzero(finite_mask))} non-finite "
                             f"values (NaN or infinity) in {rows} {split} rows: the file is damaged; delete it and "
                             f"run featcache extract again")
    return block


def float32_bytes(paths: dict[str, Path], refs) -> int:
    total = 0
    for backbone, path in paths.items():
        with FeatureCache(path) as cache:
            for split in ("train", "test"):
                shapes = cache.taps(split)
                total += sum(4 * shapes[r.tap][0] * shapes[r.tap][1] for r in refs if r.backbone == backbone)
    return total
