"""Stage 5 (fuse) driver: load cached taps once, then fuse and train every (taps, head) combination.

Flow: store -> caches -> fusion -> heads -> evaluate -> records. A combination already trained
with identical options on identical caches is served from its run folder.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError, unknown
from featcache.extraction.config import ExtractConfig
from featcache.extraction.reader import FeatureCache
from featcache.extraction.run import extract
from featcache.files import lock
from featcache.fuse.caches import (
    Features,
    check_alive,
    check_taps,
    float32_bytes,
    load_features,
    locate_caches,
    official_val,
    shared_rows,
)
from featcache.fuse.evaluate import (
    cross_validate,
    cv_folds,
    fit_select,
    score,
    selection_warnings,
    small_validation,
    validation_split,
)
from featcache.fuse.fusion import TapNormalizer, parse_taps
from featcache.fuse.heads import HEADS, HeadOptions, heads_for
from featcache.fuse.saved import save_head
from featcache.fuse.stream import FusedRows, fit_normalizer
from featcache.requests import request_hash
from featcache.runs.comparison import base_label
from featcache.runs.records import (
    RunRecord,
    library_versions,
    load_record,
    result_line,
    run_folders,
    save_run,
)


@dataclass(frozen=True)
class FuseTrainConfig:
    """Flags of ``featcache fuse-train``."""

    features: ExtractConfig = field(default_factory=ExtractConfig)
    taps: tuple[str, ...] = ("late",)  # each entry is one fusion, e.g. "early,late"
    heads: tuple[str, ...] = ("logreg",)
    tap_norm: str = "standard"
    val_fraction: float = 0.1
    options: HeadOptions = field(default_factory=HeadOptions)
    runs_dir: Path = Path("runs")
    run_extract: bool = False
    out_of_core: bool = False  # stream row chunks from HDF5 instead of loading the taps
    force: bool = False  # train again even when an identical request already has a run
    allow_dead_taps: bool = False  # train on taps whose stored values carry no signal (warned, not refused)
    tap_selection: tuple = ()  # --taps auto: the greedy path that chose the taps, recorded in each run
    cv: int = 0  # --cv K: hyper-parameters chosen by stratified K-fold cross-validation over train (0: a validation split)
    notes: tuple[str, ...] = ()  # said in every run's warnings (a sweep's kept run: why it may differ from its row)

    def __post_init__(self):
        for head in self.heads:
            if head not in heads_for("fuse-train"):
                raise unknown("--head", head, heads_for("fuse-train"))
            if not HEADS[head].torch and self.out_of_core:
                raise FeatcacheError(f"--out-of-core streams features to the torch heads (linear, mlp); {head} needs "
                                     f"them in memory: use --head linear or mlp, or drop --out-of-core")
        TapNormalizer(self.tap_norm)
        if self.cv:
            check_cv_request(self.cv, out_of_core=self.out_of_core, auto="auto" in self.taps)
        if not 0 < self.val_fraction < 1:
            raise FeatcacheError(f"--val-fraction must lie between 0 and 1. Got {self.val_fraction} instead.")


def fuse_train(cfg: FuseTrainConfig, log=print) -> list[Path]:
    """Train every (taps, head) combination; return its run folders, in order.

    A combination whose identical request (same options, same caches) already has a run in
    ``cfg.runs_dir`` is served from that run unless ``cfg.force``.
    """
    feat_cfg = cfg.features
    tapsets = [parse_taps(t, feat_cfg) for t in cfg.taps]  # bad names fail before any long work
    if cfg.run_extract:
        extract(feat_cfg, log=log)
    paths = locate_caches(feat_cfg)
    keys = sorted({_request_key(cfg, refs, h, paths) for refs in tapsets for h in cfg.heads})
    with contextlib.ExitStack() as held:
        # One writer per identical request: a second fuse-train of it waits here, then is served the first's run
        # (a lock per request, taken in one order, so different requests in one runs folder train side by side).
        for key in keys:
            held.enter_context(lock(Path(cfg.runs_dir) / ".locks" / f"{key}.lock", what="runs folder",
                                    fix="choose another --runs-dir",
                                    on_wait=lambda: log(f"another featcache process is training this request in "
                                                        f"{cfg.runs_dir}: waiting for it")))
        served = _served(cfg, tapsets, paths, log)
        todo = [(refs, heads) for refs in tapsets
                if (heads := tuple(h for h in cfg.heads if (refs, h) not in served))]
        trained = _train(cfg, todo, paths, log) if todo else {}
    return [served.get((refs, h)) or trained[(refs, h)] for refs in tapsets for h in cfg.heads]


def _request_key(cfg: FuseTrainConfig, refs, head: str, paths: dict[str, Path]) -> str:
    """What one run's result depends on: its options, taps, head and the caches' fingerprints."""
    return request_hash([_run_config(cfg), [str(r) for r in refs], head, sorted(p.name for p in paths.values())])


def _served(cfg: FuseTrainConfig, tapsets, paths, log) -> dict:
    """(refs, head) -> an existing run of the identical request; empty with ``force``."""
    if cfg.force:
        return {}
    existing = {}  # request -> (folder, record): each record read once
    for folder in run_folders(cfg.runs_dir):
        with contextlib.suppress(FeatcacheError):
            record = load_record(folder)
            existing.setdefault(record.request, (folder, record))
    served = {}
    for refs in tapsets:
        for head in cfg.heads:
            found = existing.get(_request_key(cfg, refs, head, paths))
            if found is not None:
                served[(refs, head)] = found[0]
                log(f"{result_line(*found)}  (identical request: served from this run; --force trains again)")
    return served


def _train(cfg: FuseTrainConfig, todo, paths, log) -> dict:
    """(refs, head) -> the run folder written, for each (tap set, heads) in ``todo``."""
    if cfg.out_of_core:
        return _fuse_train_streaming(cfg, todo, paths, log)
    refs_needed = {ref for refs, _ in todo for ref in refs}
    written = {}
    try:
        data = load_features(paths, refs_needed, cfg.allow_dead_taps, log)
        fit_rows, val_rows, split_notes = _split(data.labels["train"], cfg, log, data.official_val)
        folds = cv_folds(data.labels["train"], cfg.cv, cfg.features.data.seed) if cfg.cv else None
        for refs, heads in todo:
            train_blocks = [data.taps[("train", r)] for r in refs]
            normalizer = TapNormalizer(cfg.tap_norm).fit([b[fit_rows] for b in train_blocks])
            X_fit = normalizer.transform([b[fit_rows] for b in train_blocks])
            X_val = None if folds else normalizer.transform([b[val_rows] for b in train_blocks])
            X_test = normalizer.transform([data.taps[("test", r)] for r in refs])
            fusion = _Fusion(refs, normalizer, (X_fit, X_val, X_test), (fit_rows, val_rows), split_notes,
                             (train_blocks, folds) if folds else None)
            written.update(_train_heads(cfg, heads, fusion, data, paths, log))
    except (MemoryError, OSError) as exc:
        if isinstance(exc, OSError) and "memory allocation failed" not in str(exc):
            raise
        raise FeatcacheError(f"the cached taps do not fit in memory ({float32_bytes(paths, refs_needed) / 2**30:.1f} "
                             f"GiB as float32): add --out-of-core to stream them to a linear or mlp head") from None
    return written


def _fuse_train_streaming(cfg: FuseTrainConfig, todo, paths, log) -> dict:
    """fuse-train with features streamed from the caches in row chunks (torch heads only)."""

    started = time.perf_counter()
    written = {}
    with contextlib.ExitStack() as stack:
        caches = {b: stack.enter_context(FeatureCache(p)) for b, p in paths.items()}
        classes, labels, index = shared_rows(caches, paths)
        data = Features(classes, labels, index, {}, {b: c.fingerprint for b, c in caches.items()},
                        time.perf_counter() - started, official_val(caches))
        fit_rows, val_rows, split_notes = _split(labels["train"], cfg, log, data.official_val)
        for refs, heads in todo:
            check_taps(caches, paths, refs)
            check_alive(caches, paths, refs, cfg.allow_dead_taps, log)
            normalizer = fit_normalizer(cfg.tap_norm, FusedRows(caches, refs, "train", fit_rows))
            streams = (FusedRows(caches, refs, "train", fit_rows, normalizer),
                       FusedRows(caches, refs, "train", val_rows, normalizer),
                       FusedRows(caches, refs, "test", np.arange(len(labels["test"])), normalizer))
            fusion = _Fusion(refs, normalizer, streams, (fit_rows, val_rows), split_notes)
            written.update(_train_heads(cfg, heads, fusion, data, paths, log))
    return written


@dataclass(frozen=True)
class _Fusion:
    """One combination of taps, fused: its normaliser and the (fit, val, test) matrices or row streams."""

    refs: tuple
    normalizer: TapNormalizer
    X: tuple  # (fit, val, test): arrays, or FusedRows streamed from the caches
    rows: tuple  # (fit rows, val rows) of the train split (cross-validating: every training row, twice)
    notes: tuple = ()  # warnings about the split itself, recorded in every run
    cv: tuple | None = None  # --cv: (the taps' training blocks, the folds)


def _split(labels, cfg: FuseTrainConfig, log, official=None) -> tuple:
    """(fit rows, validation rows, warnings) of the training split; a validation split too small to choose
    on is said once here and recorded in every run. Cross-validating, both are every training row (the folds
    validate on each once; the chosen head is fitted on all)."""
    if cfg.cv:
        fit_rows = val_rows = np.arange(len(labels))
        notes = tuple(n for n in [small_validation(labels, cv=cfg.cv)] if n)
    else:
        fit_rows, val_rows = validation_split(labels, cfg.val_fraction, cfg.features.data.seed, official)
        notes = tuple(n for n in [small_validation(labels[val_rows], labels)] if n)
    for note in notes:
        log(f"warning: {note}")
    return fit_rows, val_rows, notes


def _train_heads(cfg, heads, fusion: _Fusion, data: Features, paths, log) -> dict:
    """Each head on one fusion: selected on validation, scored once on test, saved as a run."""
    X_fit, X_val, X_test = fusion.X
    fit_rows, val_rows = fusion.rows
    refs = fusion.refs
    y_all, y_test = data.labels["train"], data.labels["test"]
    written = {}
    for head_name in heads:
        if fusion.cv:
            blocks, folds = fusion.cv
            selection = cross_validate(HEADS.lookup(head_name), cfg.options, blocks, y_all, folds,
                                       _normalise(cfg.tap_norm))
        else:
            selection = fit_select(HEADS.lookup(head_name), cfg.options, X_fit, y_all[fit_rows], X_val,
                                   y_all[val_rows])
        metrics = score(selection.head, X_test, y_test, data.classes)
        notes = selection_warnings(head_name, selection, cfg.options.epochs if HEADS[head_name].torch else None)
        record = _record(cfg, fusion, head_name, selection, metrics, data, paths)
        record = replace(record, warnings=[*fusion.notes, *cfg.notes, *notes])
        run = save_run(cfg.runs_dir, base_label(record), record,
                       lambda folder: save_head(folder, fusion.normalizer, selection.head))
        log(result_line(run, record))
        for note in notes:
            log(f"warning: {note}")
        written[(refs, head_name)] = run
    return written


def _normalise(tap_norm: str):
    """``normalise(blocks, fit_rows, parts)``: the fused ``blocks`` at each row list of ``parts``, normalised per tap
    on ``fit_rows`` (a fold's own: its held-out rows never shape the scale)."""
    def normalise(blocks, fit_rows, parts):
        normalizer = TapNormalizer(tap_norm).fit([b[fit_rows] for b in blocks])
        return [normalizer.transform([b[rows] for b in blocks]) for rows in parts]
    return normalise


def check_cv_request(cv: int, out_of_core: bool = False, auto: bool = False) -> None:
    """One line for a ``--cv`` that cannot be honoured, before any work."""
    if cv < 2:
        raise FeatcacheError(f"--cv must be 0 (a validation split) or a number of folds of 2 or more. Got {cv} instead.")
    if out_of_core:
        raise FeatcacheError("--cv fits every candidate on each fold in memory: drop --out-of-core, or use "
                             "--val-fraction")
    if auto:
        raise FeatcacheError("--taps auto chooses taps on one validation split; with --cv, compare taps with "
                             "`featcache sweep --cv K` and name the best with --taps")


def _run_config(cfg: FuseTrainConfig) -> dict:
    """The request as a run record's ``config`` holds it."""
    return {
        **cfg.features.record_fields(), "tap_norm": cfg.tap_norm, "val_fraction": cfg.val_fraction,
        "out_of_core": cfg.out_of_core,
        "head_options": dict(vars(cfg.options)),
        **({"tap_selection": list(cfg.tap_selection)} if cfg.tap_selection else {}),
        **({"cv": cfg.cv} if cfg.cv else {}),  # absent without it: earlier runs keep their request keys
    }


def _record(cfg, fusion: _Fusion, head_name, selection, metrics, data, paths) -> RunRecord:
    refs, (fit_rows, val_rows) = fusion.refs, fusion.rows
    history = getattr(selection.head, "history_", None)
    return RunRecord(
        kind="frozen",
        taps=[str(r) for r in refs],
        head=head_name,
        dim=fusion.X[0].shape[1],
        classes=data.classes,
        config=_run_config(cfg),
        request=_request_key(cfg, refs, head_name, paths),
        caches={b: {"path": str(p), "fingerprint": data.fingerprints[b]} for b, p in paths.items()},
        rows={"train": len(fit_rows), "val": len(val_rows), "test": len(data.labels["test"]),
              **({"cv": cfg.cv} if cfg.cv else {})},
        selection={"params": selection.params, "val_accuracy": selection.val_accuracy,
                      "candidates": selection.candidates,
                      "best_epoch": getattr(selection.head, "best_epoch_", None)},
        curves=history,
        metrics=metrics,
        test_index=data.index["test"],  # source positions of the scored test rows (skipped images are not)
        timings={"load_seconds": data.load_seconds, "fit_seconds": selection.fit_seconds,
                    "predict_seconds": metrics["predict_seconds"]},
        versions=library_versions(),
    )
