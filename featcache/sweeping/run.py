"""The sweep: every tap combination x head x seed (x few-shot draw) from one load of the caches.

Flow: caches -> fusion (per-tap standardisation on the training rows) -> **run** -> probes ->
the sweep folder ``RUNS/sweeps/<name>/`` (its rows and tables: sweep/tables). For each seed and few-shot draw, the logistic regressions
of every combination left are solved together first (:func:`~featcache.sweeping.probes.presolve`), then
each (combination, head) is chosen on validation and scored in turn. It writes:

- ``rows.jsonl``: one line per finished evaluation, appended as it finishes; a re-run of the
  same request skips those (an interrupted sweep resumes where it stopped);
- ``table.csv`` (and ``table.parquet`` when pandas can write it): one row per (combination,
  head) of this request (rows.jsonl keeps earlier requests' evaluations too, for reuse), averaged
  over seeds, with the 95% interval of test accuracy;
- ``fewshot.csv``: per (combination, head, shots), mean and 95% interval over the draws;
- ``sweep.json``: the request, every tap in network order (the report's depth axis) and the weights.

The best ``--keep`` (combination, head) by validation accuracy are then trained as ordinary
runs by fuse-train, each as the first seed's replicate (that seed's split and choice; the svm
linear, as swept), so runs, predict, report and the fine-tune warm start use them unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from featcache import torchrun
from featcache.errors import FeatcacheError, require
from featcache.extraction.reader import FeatureCache
from featcache.extraction.run import extract
from featcache.extraction.store import file_safe
from featcache.files import atomic_write, lock
from featcache.fuse.caches import load_features, locate_caches
from featcache.fuse.evaluate import (
    check_cv,
    cv_folds,
    small_validation,
    validation_split,
)
from featcache.fuse.fusion import fused_parts, standardised
from featcache.fuse.heads import HEADS
from featcache.requests import request_hash
from featcache.runs.records import load_record
from featcache.sweeping import pairs
from featcache.sweeping.config import SweepConfig, all_taps, combinations, logits_taps
from featcache.solvers.lanes import batch_limit, partition, problem_bytes
from featcache.sweeping.probes import batched, grid_of, presolve, probe
from featcache.sweeping.moments import ScoreBlocks
from featcache.sweeping.scorers import SCORERS, scored
from featcache.sweeping.tables import (
    fewshot_lines,
    finished,
    fold_ranks,
    public,
    read_rows,
    row_key,
    score_lines,
    tables,
    top_lines,
    write_tables,
)


def sweep(cfg: SweepConfig, log=print, progress: bool = False) -> Path:
    """Run (or resume) the sweep; return its folder. ``progress``: a bar over the evaluations left."""
    return sweep_and_keep(cfg, log, progress)[0]


def sweep_and_keep(cfg: SweepConfig, log=print, progress: bool = False) -> tuple[Path, int, list[Path]]:
    """:func:`sweep`, returning (its folder, the evaluations it computed, the run folders of its ``--keep``)."""
    r = torchrun.current()
    torchrun.init(r)
    if r.world > 1:  # a GPU per rank: cuda:LOCAL_RANK becomes the one "cuda" names
        torchrun.device_for(r, cfg.options.device)
    log = _warning_once(log if r.main else _quiet)  # the kept runs' fuse-train repeats the sweep's warnings
    progress = progress and r.main  # under torchrun rank 0 speaks for the job
    combos = combinations(cfg)  # every check before any long work
    if cfg.run_extract:
        extract(cfg.features, log=log)
    paths, folder = torchrun.together(r, lambda: _located(cfg, r))  # a cache missing on one rank fails every rank
    torchrun.same(r, folder.name, "sweep (its folder, named by the request and the caches' fingerprints)")
    # One writer per sweep folder: a second identical sweep waits, then finds every row done and its kept runs
    # served (two at once duplicated every row and kept every run twice). Under torchrun rank 0 holds the lock for
    # the job, and the other ranks wait for it at the barrier.
    waiting = lambda: log(f"another featcache sweep is writing {folder}: waiting for it")  # noqa: E731
    with (lock(folder.parent / f".{folder.name}.lock", on_wait=waiting, what="sweeps folder",
               fix="choose another --runs-dir") if r.main else contextlib.nullcontext()):
        torchrun.barrier(r)
        todo = _jobs(cfg, combos)
        if r.main:  # a killed torchrun job's rank rows, in the order one process writes them
            fold_ranks(folder, {row_key(job): i for i, job in enumerate(todo)})
        done = torchrun.agree(r, finished(folder) if r.main else None)
        count, searched = 0, {}
        finished_here = sum(row_key(job) in done for job in todo)
        if cfg.pair_search == "promise":  # the singles, then pairs in order of promise until the search stops
            todo, count, searched = _pair_search(cfg, paths, folder, combos, done, log, progress)
        elif finished_here == len(todo):
            log(f"every evaluation of this sweep is in {folder}: writing its tables")
        else:
            if finished_here:
                log(f"resuming: {finished_here} of {len(todo)} evaluations are already in {folder}")
            count = _spread(cfg, paths, folder, todo, done, log, progress, r)
        if not r.main:  # rank 0 writes the tables and trains the kept runs
            return folder, count, []
        # for the report, not in the folder's hash: every tap in network order, and whether the weights are random
        # (written each time: a damaged sweep.json of a finished sweep is mended by running it again)
        shown = {"taps": [str(r) for r in all_taps(cfg.features)], "weights": str(cfg.features.weights),
                 "data_dir": None if cfg.features.data.data_dir is None else str(cfg.features.data.data_dir),
                 "validation": f"cv{cfg.cv}" if cfg.cv else _validation(paths)}
        atomic_write(folder / "sweep.json", json.dumps({**_request(cfg, paths), **shown, **searched}, indent=2,
                                                       default=str))
        rows = read_rows(folder)  # read once: the tables and the kept runs' choices
        table, fewshot, scores = tables(rows, [row_key(job) for job in todo])
        write_tables(folder, table, fewshot, scores)
        for line in top_lines(table) + fewshot_lines(fewshot, table) + score_lines(scores):
            log(line)
        if searched:
            log(pairs.line(searched))
        kept = _keep(cfg, table, rows, log) if cfg.keep else []
    log(f"sweep written to {folder} (table.csv: every combination and head"
        + (", fewshot.csv: every combination's few-shot accuracy" if len(fewshot) else "")
        + (", scores.csv: every combination's scores" if len(scores) else "") + ")")
    return folder, count, kept


def _located(cfg: SweepConfig, r) -> tuple[dict, Path]:
    """The caches and the sweep's folder; the checks that read the caches (the labels, for --shots and --cv)."""
    require(r.world == 1 or cfg.pair_search != "promise", "--pair-search", "promise",
            "run in one process: each step of the search waits on the last (under torchrun use --pair-search all)")
    paths = locate_caches(cfg.features)
    if cfg.shots or cfg.cv:  # checked on the labels alone, before the sweep takes its folder
        with FeatureCache(next(iter(paths.values()))) as cache:
            _check_shots(cfg, cache.labels("train"))
            if cfg.cv:
                check_cv(cache.labels("train"), cfg.cv)
    return paths, _folder(cfg, paths)


def _spread(cfg: SweepConfig, paths: dict, folder: Path, todo: list[dict], done: set, log, progress: bool, r) -> int:
    """The evaluations of ``todo`` not ``done``; under torchrun each rank takes every ``world``-th unit (:func:`_units`:
    what one process computes together, so the rows are its) into its own rows file, and rank 0 folds those into
    rows.jsonl once every rank has finished. Returns the evaluations computed (by every rank)."""
    if r.world == 1:
        return _evaluate(cfg, paths, folder, todo, done, log, progress)
    started = time.perf_counter()
    pending = [job for job in todo if row_key(job) not in done]
    units = _all_units(cfg, paths, pending)
    unit_of = {row_key(job): i for i, unit in enumerate(units) for job in unit}
    mine = [job for i in torchrun.share(list(range(len(units))), r) for job in units[i]]
    spent = {"reading": 0.0, "heads": 0.0}
    count = _evaluate(cfg, paths, folder, mine, done, log, progress, timed=False, rows=torchrun.rows_file(folder, r),
                      spent=spent, unit_of=unit_of)
    ranks = torchrun.gather(r, (count, spent))  # also the barrier: every rank has finished its rows
    count = sum(c for c, _ in ranks)
    if r.main:
        merging = time.perf_counter()
        fold_ranks(folder, {row_key(job): i for i, job in enumerate(todo)})
        most = {part: max(s[part] for _, s in ranks) for part in spent}
        log(f"{count} evaluations in {time.perf_counter() - started:.1f} s on {r.world} processes (the slowest rank "
            f"reading and standardising {most['reading']:.1f} s, the heads and scores {most['heads']:.1f} s; merging "
            f"{time.perf_counter() - merging:.1f} s)")
    return count


def _all_units(cfg: SweepConfig, paths: dict, pending: list[dict]) -> list[list[dict]]:
    """Every unit (:func:`_units`) of ``pending``, replicate by replicate and draw by draw as :func:`_evaluate` takes
    them, from the caches' labels and tap widths alone (before any rank reads its taps)."""
    import torch

    with FeatureCache(next(iter(paths.values()))) as cache:
        labels, official, n_classes = cache.labels("train"), cache.official_val("train"), len(cache.classes)
    widths = {}
    for ref in dict.fromkeys(ref for job in pending for ref in job["refs"]):
        with FeatureCache(paths[ref.backbone]) as cache:
            widths[ref] = cache.taps("train")[ref.tap][1]
    splits = _splits(cfg, labels, official)
    units = []
    for seed, fold in cfg.replicates():
        fit_rows = splits[(seed, fold)][0]
        jobs = [job for job in pending if (job["seed"], job.get("fold")) == (seed, fold)]
        for draw, group in _grouped(jobs, lambda job: (job["shots"], job["repeat"])).items():
            n = len(_draw(labels[fit_rows], draw[0], seed, draw[1])) if draw[0] else len(fit_rows)
            units += _units(group, n, widths, n_classes, cfg.options, torch.device(cfg.options.device).type)
    return units


def _quiet(message: str) -> None:
    pass


def _pair_search(cfg: SweepConfig, paths: dict, folder: Path, combos, done: set, log, progress: bool):
    """``--pair-search promise``: the singles and explicit combinations, then the pairs most promising first
    (:mod:`featcache.sweeping.pairs`), a few at a time, until ``--pair-patience`` pairs in a row beat no earlier
    pair on validation. Returns (the jobs evaluated, how many were computed here, what sweep.json records).
    Resumed, it reads the rows already there and takes the same path."""
    data = _load(cfg, paths, log)
    taps = all_taps(cfg.features)
    search = list(itertools.combinations(taps, 2))
    searched = set(search)
    first = _jobs(cfg, [c for c in combos if tuple(c) not in searched])
    count = _evaluate(cfg, paths, folder, first, done, log, progress, data=data)
    alone = {t[0]: acc for t, acc in pairs.validation_accuracy(read_rows(folder), {row_key(j) for j in first}).items()
             if len(t) == 1}
    seed, fold = cfg.replicates()[0]
    fit_rows = _splits(cfg, data.labels["train"], data.official_val)[(seed, fold)][0]
    cka = pairs.pair_cka({r: data.taps[("train", r)] for r in taps}, fit_rows, taps, seed)
    order = pairs.promise_order(search, alone, cka)
    stopper, jobs, evaluated, stopped = pairs.Stopper(cfg.pair_patience), list(first), 0, False
    step = max(1, min(8, cfg.pair_patience))  # pairs solved together (the solvers batch them)
    while evaluated < len(order) and not stopped:
        chunk = order[evaluated:evaluated + step]
        chunk_jobs = _jobs(cfg, chunk)
        count += _evaluate(cfg, paths, folder, chunk_jobs, done, log, progress, data=data, timed=False)
        jobs += chunk_jobs
        accs = pairs.validation_accuracy(read_rows(folder), {row_key(j) for j in chunk_jobs})
        evaluated += len(chunk)
        for pair in chunk:
            if stopper.add(accs.get(tuple(str(r) for r in pair), -1.0)):
                stopped = evaluated < len(order)
                break
    return jobs, count, pairs.summary(order, evaluated, stopped, cfg.pair_patience)


def _load(cfg: SweepConfig, paths: dict, log, jobs: list[dict] | None = None):
    """The taps ``jobs`` read (None: every tap the sweep may read), both splits (float32): a sweep of the late
    taps alone reads and standardises those only."""
    refs = set(all_taps(cfg.features)) if jobs is None else {ref for job in jobs for ref in job["refs"]}
    return load_features(paths, refs | set(logits_taps(cfg)), allow_dead=True, log=log)


def _evaluate(cfg: SweepConfig, paths: dict, folder: Path, todo: list[dict], done: set, log, progress: bool,
              data=None, timed: bool = True, rows: Path | None = None, spent: dict | None = None,
              unit_of: dict | None = None) -> int:
    """Every job of ``todo`` not ``done``, appended to the folder's rows.jsonl (or ``rows``) as it finishes; returns
    how many. ``data``: the taps, where the caller loaded them already; ``timed``: say how long it took and where
    it went; ``spent``: add the seconds reading (and standardising) the taps and fitting the heads to it;
    ``unit_of``: each job's unit (:func:`_units`), where the caller split the units among processes (default: every
    unit of ``todo``)."""
    import torch
    from tqdm.auto import tqdm

    if not any(row_key(job) not in done for job in todo):
        return 0
    began = time.perf_counter()
    data = data if data is not None else _load(cfg, paths, log, [job for job in todo if row_key(job) not in done])
    reading = time.perf_counter() - began  # and standardising, below
    if unit_of is None:  # one process: every unit in turn
        units = _all_units(cfg, paths, [job for job in todo if row_key(job) not in done])
        unit_of = {row_key(job): i for i, unit in enumerate(units) for job in unit}
    labels = data.labels
    n_classes = len(data.classes)
    device = torch.device(cfg.options.device)
    folder.mkdir(parents=True, exist_ok=True)
    splits = _splits(cfg, labels["train"], data.official_val)
    held = labels["train"] if cfg.cv else labels["train"][splits[cfg.replicates()[0]][1]]  # what validates
    if note := small_validation(held, labels["train"], cfg.cv):
        log(f"warning: {note}")  # before the bar, so that the two do not share a line
    count = 0
    bar = tqdm(total=sum(row_key(job) not in done for job in todo), unit="eval", desc="sweep", disable=not progress,
               leave=False)
    with bar, open(rows or folder / "rows.jsonl", "a") as out:
        for seed, fold in cfg.replicates():
            fit_rows, val_rows = splits[(seed, fold)]
            at = time.perf_counter()
            X = standardised(data, fit_rows, val_rows, device)
            reading += time.perf_counter() - at
            y = {"fit": labels["train"][fit_rows], "val": labels["train"][val_rows], "test": labels["test"]}
            y = {part: torch.as_tensor(v, dtype=torch.int64, device=device) for part, v in y.items()}
            options = replace(cfg.options, seed=seed)
            pending = [job for job in todo
                       if (job["seed"], job.get("fold")) == (seed, fold) and row_key(job) not in done]
            for draw in dict.fromkeys((job["shots"], job["repeat"]) for job in pending):
                group = [job for job in pending if (job["shots"], job["repeat"]) == draw]
                parts, labels_of = dict(X), dict(y)
                if draw[0]:  # the few-shot rows of this draw, the same for every combination and head
                    rows = _draw(labels["train"][fit_rows], draw[0], seed, draw[1])
                    parts["fit"] = {ref: block[rows] for ref, block in X["fit"].items()}
                    labels_of["fit"] = y["fit"][rows]
                for unit in _grouped(group, lambda job: unit_of[row_key(job)]).values():
                    count += _unit(unit, parts, labels_of, data, fit_rows, y, n_classes, options, fold, out, done, bar)
    total = time.perf_counter() - began
    if spent is not None:
        spent["reading"], spent["heads"] = spent["reading"] + reading, spent["heads"] + total - reading
    if timed:
        log(f"{count} evaluations in {total:.1f} s (reading and standardising the taps {reading:.1f} s, the heads "
            f"and scores {total - reading:.1f} s)")
    return count


def _unit(unit: list[dict], parts: dict, labels_of: dict, data, fit_rows, y: dict, n_classes: int, options, fold,
          out, done: set, bar) -> int:
    """Evaluate one unit's jobs (:func:`_units`) and append their rows; returns how many."""
    import torch

    solved, rotations = _presolved(unit, parts["fit"], labels_of["fit"], n_classes, options, bar)
    blocks = ScoreBlocks.of([job["refs"] for job in unit if job.get("kind") == "score"
                             and SCORERS.lookup(job["head"]).from_moments], parts["fit"], labels_of["fit"], n_classes)
    refs, fused, stats = None, None, None
    for job in unit:
        if job["refs"] != refs:  # jobs come grouped by combination: concatenate its taps once
            refs = job["refs"]
            fused = fused_parts(parts, refs)
            stats = None  # its block of the Gram, decomposed once for all its scores
        if job.get("kind") == "score" and SCORERS.lookup(job["head"]).reads_logits:  # the logits as stored
            raw = torch.as_tensor(data.taps[("train", refs[0])][fit_rows])
            result = scored(job["head"], raw, y["fit"], n_classes)
        elif job.get("kind") == "score":
            if stats is None and blocks is not None:
                stats = blocks.take(refs)
            result = scored(job["head"], fused["fit"], labels_of["fit"], n_classes, stats)
        else:
            result = probe(job["head"], fused, labels_of, n_classes, options, solved=solved.get(row_key(job)),
                           rotated=rotations.get(tuple(refs)), every=fold is not None)
        out.write(json.dumps({**public(job), "width": int(fused["fit"].shape[1]), **result}, default=str) + "\n")
        out.flush()
        done.add(row_key(job))
        bar.set_postfix_str(f"{job['head']} {'+'.join(map(str, refs))}"[:60], refresh=False)
        bar.update()
    return len(unit)


def _units(group: list[dict], n: int, widths: dict, n_classes: int, options, device_type: str) -> list[list[dict]]:
    """A group's jobs (one replicate and draw) in the units they are computed in, whose numbers depend on nothing
    outside them: the scores together (one Gram of their taps); the combinations each batch of the batched logreg
    solves together (:func:`~featcache.solvers.lanes.partition`: a problem's numbers depend on its batch), with
    all their other heads (an svm reuses its combination's rotation); every other combination alone. One process
    computes them in turn; under torchrun each rank takes whole units, so its rows are one process's."""
    scores = [job for job in group if job.get("kind") == "score"]
    probes = [job for job in group if job.get("kind") != "score"]
    units, placed = [], set()
    for head in batched():
        jobs = [job for job in probes if job["head"] == head]
        sizes = [problem_bytes(n, [widths[r] for r in job["refs"]], len(grid_of(head, options)), n_classes)
                 for job in jobs]
        for part in partition(sizes, batch_limit(device_type)):
            combos = {tuple(jobs[i]["refs"]) for i in part} - placed
            placed |= combos
            units.append([job for job in probes if tuple(job["refs"]) in combos])
    units += list(_grouped([job for job in probes if tuple(job["refs"]) not in placed],
                           lambda job: tuple(job["refs"])).values())
    return [unit for unit in [scores, *units] if unit]


def _grouped(jobs: list[dict], key) -> dict:
    """``jobs`` by ``key(job)``, each group in the jobs' order, the groups in order of first appearance."""
    out: dict = {}
    for job in jobs:
        out.setdefault(key(job), []).append(job)
    return out


def _splits(cfg: SweepConfig, labels, official) -> dict:
    """(seed, fold) -> (fit rows, validation rows) of every replicate: a seed's validation split (a dataset's own,
    where it has one), or with ``--cv`` each of a seed's K stratified folds."""
    if not cfg.cv:
        return {(seed, None): validation_split(labels, cfg.val_fraction, seed, official) for seed in cfg.seeds}
    return {(seed, fold): rows for seed in cfg.seeds for fold, rows in enumerate(cv_folds(labels, cfg.cv, seed))}


def _warning_once(log):
    said = set()

    def once(message: str) -> None:
        if message.startswith("warning:"):
            if message in said:
                return
            said.add(message)
        log(message)
    return once


def _presolved(group: list, fit: dict, y, n_classes: int, options, bar) -> tuple[dict, dict]:
    """The fits of ``group``'s jobs whose head is solved for many combinations at once: ({job key: fits}, {taps:
    their rotated features, for the same combination's svm})."""
    solved, rotations = {}, {}
    svm = {tuple(job["refs"]) for job in group if job["head"] == "svm"}
    for head in batched():
        jobs = [job for job in group if job["head"] == head and job.get("kind") != "score"]
        if jobs:
            bar.set_postfix_str(f"{head}: {len(jobs)} combinations at once", refresh=True)
            problems = [[fit[r] for r in job["refs"]] for job in jobs]
            for job, (fits, rotated) in zip(jobs, presolve(head, problems, y, n_classes, options, rotations=bool(svm))):
                solved[row_key(job)] = fits
                if rotated is not None and tuple(job["refs"]) in svm:
                    rotations[tuple(job["refs"])] = rotated
    return solved, rotations


def _jobs(cfg: SweepConfig, combos) -> list[dict]:
    """Every evaluation of the request, grouped by replicate; a fold (``--cv``) is part of a job's key."""
    jobs = []
    for seed, fold in cfg.replicates():
        at = {"seed": seed, **({"fold": fold} if fold is not None else {})}
        jobs += [{**at, "refs": refs, "head": h, "shots": 0, "repeat": 0} for refs in combos for h in cfg.heads]
        jobs += [{**at, "refs": refs, "head": name, "shots": 0, "repeat": 0, "kind": "score"}
                 for refs in combos for name in cfg.scores if not SCORERS.lookup(name).reads_logits]
        jobs += [{**at, "refs": (ref,), "head": name, "shots": 0, "repeat": 0, "kind": "score"}  # a model's own
                 for ref in logits_taps(cfg) for name in cfg.scores if SCORERS.lookup(name).reads_logits]
        fast = [h for h in cfg.heads if HEADS[h].fewshot]
        jobs += [{**at, "refs": refs, "head": h, "shots": k, "repeat": r}
                 for k in cfg.shots for r in range(cfg.repeats) for refs in combos for h in fast]
    return jobs


def _request(cfg: SweepConfig, paths: dict) -> dict:
    """What the rows depend on: the caches (by file name = fingerprint), split and head options."""
    o = cfg.options
    return {"caches": sorted(p.name for p in paths.values()), "backbones": list(cfg.features.backbones),
            "dataset": cfg.features.data.name, "val_fraction": cfg.val_fraction,
            **({"cv": cfg.cv} if cfg.cv else {}),  # absent without it: earlier sweep folders keep their names

            "options": {"grid": o.grid, "hidden": o.hidden, "dropout": o.dropout, "optimizer": o.optimizer, "lr": o.lr,
                        "epochs": o.epochs, "batch_size": o.batch_size, "patience": o.patience}}


def _validation(paths: dict) -> str:
    """Where the sweep's validation rows come from: the dataset's own split, or carved from train."""
    with FeatureCache(next(iter(paths.values()))) as cache:
        official = cache.official_val("train")
    return "official" if official is not None and official.any() else "carved"


def _folder(cfg: SweepConfig, paths: dict) -> Path:
    digest = request_hash(_request(cfg, paths), 10)
    name = "+".join(file_safe(b) for b in cfg.features.backbones)[:60]
    return cfg.runs_dir / "sweeps" / f"{cfg.features.data.name}-{name}-{digest}"


def _check_shots(cfg: SweepConfig, labels: np.ndarray) -> None:
    if cfg.shots:
        smallest = int(np.bincount(labels)[np.unique(labels)].min())
        held = 1 / (cfg.cv - 1) if cfg.cv else cfg.val_fraction  # validation rows per fit row
        if max(cfg.shots) * (1 + held) > smallest:
            raise FeatcacheError(f"--shots {max(cfg.shots)} asks for more training images per class than the smallest "
                                 f"class leaves after the validation split (about "
                                 f"{int(smallest / (1 + held))}): use smaller --shots")


def _draw(labels: np.ndarray, shots: int, seed: int, repeat: int) -> np.ndarray:
    """``shots`` rows of every class, drawn for (seed, repeat) and the same for every combination and head."""
    rng = np.random.default_rng([seed, shots, repeat])
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False)
                                   for c in np.unique(labels)]))


def _keep(cfg: SweepConfig, table, rows: list[dict], log) -> list[Path]:
    """The best ``--keep`` (combination, head) by validation accuracy, trained as ordinary fuse-train runs: each
    the first seed's replicate, with the hyper-parameter that seed chose (not the table's most frequent choice,
    which another seed's split made), the svm as the sweep solved it (linear: no RBF candidate), and only the
    backbones its taps read (its label, predict and Grad-CAM then build only those)."""
    from featcache.fuse.train import FuseTrainConfig, fuse_train

    if cfg.cv:  # cross-validated: the choice of the mean over the folds (the table's), fitted on every training row
        first = {(tuple(row.taps.split("+")), row.head): json.loads(row.chosen) for row in table.itertuples()}
    else:
        first = {(tuple(r["taps"]), r["head"]): r["chosen"] for r in rows
                 if r["seed"] == cfg.seeds[0] and r["shots"] == 0 and r.get("kind") != "score"}
    runs = []
    keepable = table["head"].map(lambda h: h in HEADS and HEADS[h].keep).astype(bool)
    for row in table[keepable].head(cfg.keep).itertuples():
        chosen = first[(tuple(row.taps.split("+")), row.head)]
        grid = {name: (value,) for name, value in chosen.items() if name in ("C", "weight_decay")}
        if row.head == "svm":
            grid["kernel"] = ("linear",)
        options = replace(cfg.options, seed=cfg.seeds[0], grid={**cfg.options.grid, **grid})
        used = tuple(dict.fromkeys(tap.rsplit(":", 1)[0] for tap in row.taps.split("+")))
        features = replace(cfg.features, backbones=used, data=replace(cfg.features.data, seed=cfg.seeds[0]))
        run_cfg = FuseTrainConfig(features=features,
                                  taps=(row.taps.replace("+", ","),), heads=(row.head,), val_fraction=cfg.val_fraction,
                                  cv=cfg.cv, options=options, runs_dir=cfg.runs_dir, allow_dead_taps=True,
                                  notes=_kept_notes(cfg, row.head))
        kept = fuse_train(run_cfg, log=log)
        runs += kept
        for run in kept:  # a kept run reproduces its row, or both say why not
            record = load_record(run)
            test = record.metrics.get("accuracy")
            if test is not None and abs(test - row.test_acc) > 1e-9:
                why = "; ".join(_kept_notes(cfg, row.head)) or "the same rows and C, another solver's optimum"
                log(f"kept run {run.name}: test {test:.4f} against its sweep row's {row.test_acc:.4f} ({why})")
    return runs


def _kept_notes(cfg: SweepConfig, head: str) -> tuple[str, ...]:
    """Why a kept run's numbers may differ from its sweep row's, recorded in the run's warnings."""
    notes = []
    if cfg.cv:
        notes.append("kept from a --cv sweep: its row is the mean of the folds' fits, this run one fit on every "
                     "training row")
    if len(cfg.seeds) > 1:
        notes.append(f"kept from a sweep over seeds {', '.join(map(str, cfg.seeds))}: its row is their mean, this run "
                     f"seed {cfg.seeds[0]}'s")
    if head == "svm":
        notes.append("kept from a sweep, whose row scored the linear SVM's decision function; this run predicts from "
                     "its probabilities, calibrated by 3-fold cross-validation, so a few test images can go the "
                     "other way")
    return tuple(notes)
