"""``featcache rank``: which pretrained model, which of its layers? Every tap of many backbones scored, nothing trained.

Stage 8 (ranking), after the sweep whose scores and probes it uses. The patterns (``'resnet*'``,
``'timm:convnext*'``) are resolved to model names first, and a match larger than ``--max-models`` is refused
before anything runs. Models then go in groups of ``--models-at-once``: one shared pass extracts the group
(each image decoded once for all of them) into its caches, then each tap is read back alone, standardised on the
training rows and scored from its Gram (or kernel): one tap's features in memory at a time. A model that fails to build or run is recorded with its one-line reason, and
the ranking goes on. The folder ``runs/ranks/NAME`` holds:

- ``rows.jsonl``: one line per model as it finishes (its taps' scores, or why it failed); a killed ranking
  resumes from it, and a finished model is not done again;
- ``table.csv`` (and ``table.parquet`` with pyarrow): model, tap, width, parameters, images/s, each score,
  ordered by the first score; failures at the end with their reason;
- with ``--confirm K``: ``confirm.csv``, the batched logreg probe and k-NN on the top K taps by each score, and
  ``tau.csv``, each score's Kendall tau against the probe's validation accuracy: how far to trust it here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from featcache import torchrun
from featcache.backbones.spec import LOGITS
from featcache.backbones.weights import offline_weights
from featcache.data.safe import read_own
from featcache.errors import BudgetError, DataError, FeatcacheError, NothingWorked
from featcache.extraction.reader import FeatureCache
from featcache.extraction.request import FeatureFields
from featcache.extraction.store import timing_file
from featcache.files import atomic_write, lock
from featcache.fuse.evaluate import validation_split
from featcache.fuse.fusion import TapNormalizer, standardised_tap
from featcache.ranking.models import parameters, resolve, speed, tap_count
from featcache.requests import request_hash
from featcache.sweeping.moments import moments
from featcache.sweeping.scorers import SCORERS, scored

def folder_of(request, models: list[str], kind: str = "ranks", **depends) -> Path:
    """A ranking's folder (or, with ``kind`` and what else the result ``depends`` on, a choice's): named by the
    dataset and a hash of everything that changes its numbers, the data's identity included (as a cache's
    fingerprint holds it), so a manifest whose labels changed is ranked anew."""
    from featcache.data.datasets import dataset_identity, dataset_key

    data = request.data_request()
    features = {f.name: getattr(request, f.name) for f in dataclasses.fields(FeatureFields)
                if f.name not in ("backbone", "cache_dir", "download")}  # what changes the numbers, as a cache's
    digest = request_hash({"models": models, "scores": list(request.score), "val_fraction": request.val_fraction,
                           "data": dataset_identity(data), **features, **depends}, 10)
    return Path(request.runs_dir) / kind / f"{dataset_key(data)}-{digest}"


def read_rows(folder: Path) -> dict[str, dict]:
    """model -> its latest row, from rows.jsonl; a line cut short by a kill is left out (that model is done
    again). A failed model's row is its latest until the model is tried again: the next run retries it."""
    out = {}
    for _, line in _good_lines(folder / "rows.jsonl"):
        row = json.loads(line)
        out[row["model"]] = row
    return out


def _good_lines(path: Path) -> list[tuple[str, str]]:
    """(model, line) of every row this code wrote in a rows file, in file order."""
    good = []
    if os.path.lexists(path):
        for line in read_own(path, "ranking rows file").decode("utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError, RecursionError):
                row = json.loads(line)
                if _well_formed(row):
                    good.append((row["model"], line))
    return good


def _well_formed(row) -> bool:
    """A row this code wrote: a failure with its reason, or a model's taps each with a width and finite-or-null
    scores. Anything else (a damaged or foreign line) is passed over, and its model done again."""
    if not isinstance(row, dict) or not isinstance(row.get("model"), str):
        return False
    if row.get("status") == "failed":
        return isinstance(row.get("reason"), str)
    taps = row.get("taps")
    return row.get("status") == "ok" and isinstance(taps, list) and all(
        isinstance(t, dict) and isinstance(t.get("tap"), str) and isinstance(t.get("width"), int)
        and isinstance(t.get("scores"), dict)
        and all(v is None or isinstance(v, (int, float)) or _parts(v) for v in t["scores"].values()) for t in taps) and \
        all(row.get(k) is None or isinstance(row.get(k), (int, float)) for k in ("params", "images_per_s")) and \
        isinstance(row.get("cache", ""), str)


def _parts(value) -> bool:
    """A score with parts (NCTI, ETran) is stored as its list of numbers, combined over the table's taps."""
    return isinstance(value, list) and 0 < len(value) <= 8 and all(isinstance(x, (int, float)) for x in value)


def _stored(result: dict):
    """What a tap's row keeps of :func:`scored`'s result: the value, or the parts of a score with parts."""
    return result["parts"] if "parts" in result else result["score"]


def _end_line(path: Path) -> None:
    """A line cut short by a kill gets its end, so the next row starts a line of its own (the cut one is
    skipped by :func:`read_rows`, and its model done again)."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


def rank(request, log=print, progress: bool = True) -> Path:
    """Rank every model the request's patterns match; return the ranking's folder.

    Under torchrun each rank extracts and scores every ``world``-th model left (each model whole, on its own device)
    into its own rows file; rank 0 folds them into rows.jsonl and writes the table, the confirmation and the pruning.
    """
    r = torchrun.current()
    torchrun.init(r)
    log, progress = (log, progress) if r.main else (_quiet, False)  # rank 0 speaks for the job
    request = torchrun.together(r, request.config)  # a rank whose request or patterns fail fails every rank
    models, folder = torchrun.together(r, lambda: _checked(request))
    torchrun.same(r, folder.name, "ranking (its folder, named by the request and the data)")
    folder.mkdir(parents=True, exist_ok=True)
    waiting = lambda: log(f"waiting for another featcache rank writing {folder} ...")  # noqa: E731
    with lock(folder.parent / f".{folder.name}.lock", on_wait=waiting) if r.main else contextlib.nullcontext():
        torchrun.barrier(r)  # the other ranks wait while rank 0 waits for the lock
        order = {m: i for i, m in enumerate(models)}
        if r.main:
            torchrun.fold(folder, _good_lines, order)  # a killed torchrun ranking's rows
        done = torchrun.agree(r, read_rows(folder) if r.main else None)
        todo = [m for m in models if done.get(m, {}).get("status") != "ok"]  # failures are tried again
        if len(todo) < len(models):
            log(f"resuming: {len(models) - len(todo)} of {len(models)} models are already in {folder}")
        _score_models(request, folder, torchrun.share(todo, r), r=r, log=log, progress=progress)
        torchrun.barrier(r)  # every rank's models are in its rows file
        # rank 0 folds and tables them; the others wait, so that a choice's ranks read the finished ranking
        lines = torchrun.on_main(r, lambda: _finish(request, folder, models, order, log))
    for line in lines or ():
        log(line)
    return folder


def _finish(request, folder: Path, models: list[str], order: dict, log) -> list[str]:
    """Fold the ranks' rows, write the table (and the confirmation, the pruning); returns the closing lines."""
    torchrun.fold(folder, _good_lines, order)
    done = read_rows(folder)
    rows = [done[m] for m in models]
    table = write_table(folder, rows, list(request.score))
    atomic_write(folder / "rank.json", json.dumps(  # what the report names the ranking by (plain JSON)
        {"patterns": list(request.backbone), "models": models, "scores": list(request.score),
         "dataset": request.dataset_label(), "weights": request.weights}))
    if all(row["status"] != "ok" for row in rows):
        for row in rows:
            log(f"  {row['model']}: {row['reason']}")
        raise NothingWorked(f"every model failed ({len(rows)}; the reasons above, and in {folder / 'table.csv'}): "
                            f"nothing is ranked")
    if request.confirm:  # before --keep-caches top-K removes any: the confirmed taps read their caches
        confirm(request, folder, table, log)
    _prune(request, rows, table, log)
    return [*summary(table, list(request.score), rows), f"ranking written to {folder} (table.csv: every model and tap)"]


def _checked(request) -> tuple[list[str], Path]:
    """The models the patterns match and the ranking's folder, after every check of the request (made by its
    config)."""
    models = resolve(request.backbone, request.pretrained_only)
    if len(models) > request.max_models:
        raise FeatcacheError(f"--backbone {' '.join(request.backbone)} matches {len(models)} models, more than "
                             f"--max-models {request.max_models}: narrow the patterns or raise --max-models")
    if request.confirm and request.keep_caches == "none":
        raise FeatcacheError("--confirm needs the caches of the taps it checks: use --keep-caches all (or top-K) "
                             "with --confirm")
    if request.confirm:
        known = sum(tap_count(m) for m in models)
        if request.confirm > known:
            raise FeatcacheError(f"--confirm {request.confirm} is more than the {known} taps of the matched models: "
                                 f"use --confirm {known} or fewer")
    return models, folder_of(request, models)


def _score_models(request, folder: Path, models: list[str], r, log, progress: bool) -> None:
    """Extract and score ``models``, a few at a time, each row appended to this rank's rows file as it is made
    (under torchrun each model is extracted whole by this rank: not split again across the ranks)."""
    from tqdm.auto import tqdm

    path = torchrun.rows_file(folder, r)
    _end_line(path)
    torchrun.device_for(r, request.device)  # under torchrun, a GPU per rank: cuda:LOCAL_RANK is the current one
    bar = tqdm(total=len(models), unit="model", desc="rank", disable=not progress, leave=False)
    with bar, open(path, "a") as out, torchrun.alone():
        for start in range(0, len(models), request.models_at_once):
            group = models[start:start + request.models_at_once]
            with offline_weights(not request.download):
                rows_made = _group(request, group, bar, log)
            for row in rows_made:
                out.write(json.dumps(row) + "\n")
                out.flush()
                bar.update()


def _quiet(message: str) -> None:
    pass


def _group(request, group: list[str], bar, log) -> list[dict]:
    """Extract the group in one shared pass (each model alone if the pass fails) and score each model."""
    from featcache.extraction.run import extract

    bar.set_postfix_str(f"extracting {', '.join(group)}"[:60], refresh=True)
    quiet = lambda message: None  # noqa: E731  (the bar says what happens)
    try:
        results = {r.backbone: r for r in extract(_config(request, group), progress=False, log=quiet)}
    except (DataError, BudgetError):
        raise  # the data's own problem is every model's: said once, not recorded as a model's failure
    except Exception as exc:  # one model that fails must not fail the others: each alone, to find it
        if len(group) == 1:
            return [_failed(group[0], exc)]
        results = {}
        for name in group:
            try:
                [results[name]] = extract(_config(request, [name]), progress=False, log=quiet)
            except Exception as alone:
                results[name] = alone
    rows = []
    for name in group:
        result = results[name]
        if isinstance(result, Exception):
            rows.append(_failed(name, result))
            continue
        bar.set_postfix_str(f"scoring {name}"[:60], refresh=True)
        try:
            rows.append(_scored(request, name, result))
        except (DataError, BudgetError):
            raise  # a subset too small to validate is every model's problem
        except Exception as exc:
            rows.append(_failed(name, exc))
    return rows


def _config(request, names: list[str]):
    """The extraction of ``names``; with the source classifier's logits as a tap where a score reads them."""
    cfg = dataclasses.replace(request, backbone=tuple(names)).features(
        request.device, batch_size=request.batch_size, num_workers=request.num_workers,
        skip_bad_images=request.skip_bad_images)
    return dataclasses.replace(cfg, logits=True) if any(SCORERS.lookup(s).reads_logits for s in request.score) else cfg


def _failed(name: str, exc: Exception) -> dict:
    text = str(exc).strip().splitlines()
    reason = text[0] if isinstance(exc, FeatcacheError) and text else \
        f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")
    return {"model": name, "status": "failed", "reason": reason}


def _scored(request, name: str, result) -> dict:
    """One model's row: every tap scored by every score, on the training rows the probes would fit on; one tap's
    features in memory at a time (each is scored alone, so no tap needs another's Gram)."""
    rate = speed(_config(request, [name]), name, request.batch_size)
    scores = []
    with FeatureCache(result.path) as cache:
        labels = cache.labels("train")
        fit_rows, _ = validation_split(labels, request.val_fraction, request.seed, cache.official_val("train"))
        n_classes, y = len(cache.classes), labels[fit_rows]
        if len(np.unique(y)) < 2:
            raise DataError("the training rows hold one class: a score needs at least two")
        for tap in cache.tap_names("train"):
            values, width = score_tap(cache, name, tap, fit_rows, y, n_classes, list(request.score), request.memory)
            scores.append({"tap": tap, "width": width, "scores": values})
    if request.keep_caches == "none" and result.status != "cached":
        result.path.unlink(missing_ok=True)
        timing_file(result.path).unlink(missing_ok=True)
    return {"model": name, "status": "ok", "params": parameters(name), "images_per_s": rate,
            "cache": str(result.path), "extracted": result.status != "cached", "taps": scores}


def score_tap(cache, model: str, tap: str, fit_rows, y, n_classes: int, scores: list[str], memory: str | None):
    """({score: its stored value}, width) of one tap of an open cache on its fit rows ``fit_rows`` (labels ``y``):
    from the rows in memory, or streamed from the cache where they exceed ``memory`` (:func:`_streamed`)."""
    import torch

    needs_rows = [s for s in scores if SCORERS.lookup(s).from_moments is None and not SCORERS.lookup(s).reads_logits]
    width = cache.taps("train")[tap][1]
    if _streamed(memory, model, tap, len(fit_rows), width, needs_rows):  # its rows never all in memory
        raw, block = None, _tap_rows(cache, model, tap, fit_rows)
        stats = moments([block], y, n_classes, chunk=STREAM_ROWS)
    else:
        raw = cache.read("train", tap)[fit_rows]
        block = TapNormalizer("standard").fit_transform([raw])  # the sweep's rule
        stats = moments([block], y, n_classes)
    values = {score: _stored(scored(score, torch.from_numpy(block) if score in needs_rows else None,
                                    torch.from_numpy(y), n_classes, stats))
              for score in scores if not SCORERS.lookup(score).reads_logits}
    if tap == LOGITS:  # LEEP, NCE: the source classifier's output as stored; on no other tap
        raw = cache.read("train", tap)[fit_rows] if raw is None else raw
        values.update({score: _stored(scored(score, torch.from_numpy(raw.astype(np.float32)), torch.from_numpy(y),
                                             n_classes))
                       for score in scores if SCORERS.lookup(score).reads_logits})
    return values, int(block.shape[1])


# The rows a streamed tap's moments read at a time (None: moments' own chunk, the one the rows in memory are summed
# in, so that both give the same numbers); a test sets a few rows, to go through many chunks.
STREAM_ROWS = None
# What scoring a tap in memory holds, in bytes per value of its fit rows: the rows as read (float16 or float32),
# standardised (float32) and a float32 copy the Gram's products read
IN_MEMORY_BYTES = 12


def _streamed(memory: str | None, model: str, tap: str, n: int, width: int, needs_rows: list[str]) -> bool:
    """Whether a tap's scores are computed from its rows streamed from the cache: where ``--memory`` (default: half
    the memory available) holds less than its rows in memory and more than its Gram, with more rows than columns
    (fewer: its kernel is N x N, as large as the rows' Gram form would be). A budget below the Gram's, or a score
    that reads every row, is refused in one line."""
    from featcache.extraction.housekeeping import human_size

    budget = memory_budget(memory)
    if n * width * IN_MEMORY_BYTES <= budget or n <= width:
        return False
    gram = 3 * width * width * 8  # the float64 Gram, its decomposition's copy and workspace
    if gram > budget:
        raise BudgetError(f"--memory {human_size(budget)} is less than scoring {model}:{tap} needs with its rows "
                             f"streamed ({human_size(gram)}: its {width} x {width} Gram): raise --memory")
    if needs_rows:
        raise BudgetError(f"--score {needs_rows[0]} reads every row of a tap at once, and {model}:{tap} needs "
                             f"{human_size(n * width * IN_MEMORY_BYTES)}, more than --memory {human_size(budget)}: "
                             f"score it with LogME or the H-scores (computed from moments, streamed), or raise "
                             f"--memory")
    return True


def memory_budget(flag: str | None) -> int:
    """``--memory`` in bytes; without it, half the memory the machine has available now."""
    from featcache.extraction.housekeeping import parse_size

    if flag is not None:
        return parse_size(flag, "--memory")
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):  # not Linux: psutil where present, else no bound
        try:
            import psutil

            available = psutil.virtual_memory().available
        except ImportError:
            return 1 << 62
    return available // 2


def _tap_rows(cache, model: str, tap: str, fit_rows):
    """A tap's fit rows standardised as in memory (the normaliser fitted in one streamed pass), read from the cache
    chunk by chunk where the moments ask for them."""
    from featcache.fuse.fusion import TapRef
    from featcache.fuse.stream import FusedRows, TapRows, fit_normalizer

    data = FusedRows({model: cache}, [TapRef(model, tap)], "train", np.asarray(fit_rows))
    return TapRows(data.with_normalizer(fit_normalizer("standard", data)))


def write_table(folder: Path, rows: list[dict], scores: list[str]):
    """table.csv (and .parquet): a row per (model, tap), best first by the first score; failures last. A score with
    parts (NCTI, ETran) is combined over every tap of the table."""
    import pandas as pd

    from featcache.sweeping.scorers import combined

    records = []
    for row in rows:
        if row["status"] != "ok":
            records.append({"model": row["model"], "tap": "", "status": "failed", "reason": row["reason"]})
            continue
        for tap in row["taps"]:
            records.append({"model": row["model"], "tap": tap["tap"], "status": "ok", "reason": "",
                            "width": tap["width"], "params": row["params"], "images_per_s": row["images_per_s"],
                            **{s: tap["scores"].get(s) for s in scores}})
    ok_rows = [r for r in records if r["status"] == "ok"]
    for s in scores:
        for r, value in zip(ok_rows, combined(s, [r[s] for r in ok_rows])):
            r[s] = None if np.isnan(value) else float(value)
    table = pd.DataFrame(records, columns=["model", "tap", "status", "reason", "width", "params", "images_per_s",
                                           *scores])
    ok = table[table["status"] == "ok"].sort_values(scores[0], ascending=not SCORERS[scores[0]].larger_is_better,
                                                    kind="stable")
    table = pd.concat([ok, table[table["status"] != "ok"]], ignore_index=True)
    atomic_write(folder / "table.csv", table.to_csv(index=False))
    with contextlib.suppress(ImportError):
        import io

        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        atomic_write(folder / "table.parquet", buffer.getvalue())
    return table


def _prune(request, rows: list[dict], table, log) -> None:
    """--keep-caches top-K: the caches this ranking made for other models are removed (the best K by the table's
    first score, combined over every tap where it has parts)."""
    if not request.keep_caches.startswith("top-"):
        return
    k = int(request.keep_caches[4:])
    first = request.score[0]
    sign = 1 if SCORERS[first].larger_is_better else -1
    ok = table[table["status"] == "ok"]
    best = (sign * ok[first].astype(float)).fillna(-np.inf).groupby(ok["model"]).max().to_dict()
    keep = set(sorted(best, key=lambda m: -best[m])[:k])
    for row in rows:
        if row["status"] == "ok" and row["model"] not in keep and row.get("extracted"):
            Path(row["cache"]).unlink(missing_ok=True)
            timing_file(Path(row["cache"])).unlink(missing_ok=True)


def summary(table, scores: list[str], rows: list[dict]) -> list[str]:
    ok = table[table["status"] == "ok"]
    lines = [f"{'model':<28} {'tap':<14} {'width':>6} " + " ".join(f"{s:>10}" for s in scores)]
    for _, r in ok.head(10).iterrows():
        lines.append(f"{r['model'][:28]:<28} {r['tap'][:14]:<14} {int(r['width']):>6} "
                     + " ".join(f"{r[s]:>10.4f}" for s in scores))
    from featcache.sweeping.scorers import separates

    for s in scores:
        if len(ok) > 1 and not separates(ok[s].astype(float)):
            lines.append(f"{s} cannot tell these taps apart here: every one scores {ok[s].astype(float).max():.4f} "
                         f"(within 1e-6){' (taps wider than the rows it reads)' if s.startswith('hscore') else ''}; "
                         f"do not choose by it")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines.append(f"{len(failed)} model(s) failed and are left out of the ranking:")
        lines += [f"  {r['model']}: {r['reason']}" for r in failed]
    return lines


def confirm(request, folder: Path, table, log) -> None:
    """The batched logreg probe and k-NN on the top K taps by each score; each score's Kendall tau against the
    probe's validation accuracy (tau.csv), said in one line per score."""
    import pandas as pd
    import torch
    from scipy.stats import kendalltau

    from featcache.fuse.heads import HeadOptions
    from featcache.sweeping.probes import probe

    ok = table[table["status"] == "ok"]
    if request.confirm > len(ok):
        raise FeatcacheError(f"--confirm {request.confirm} is more than the {len(ok)} taps ranked: use --confirm "
                             f"{len(ok)} or fewer")
    picked = []
    for score in request.score:
        order = ok[ok[score].notna()].sort_values(score, ascending=not SCORERS[score].larger_is_better,
                                                   kind="stable")  # LEEP, NCE: the logits taps alone
        picked += [(m, t) for m, t in zip(order["model"].head(request.confirm), order["tap"].head(request.confirm))]
    picked = list(dict.fromkeys(picked))
    from featcache.device import resolve_device

    device = resolve_device(request.device)  # the probes run where the sweep's would
    options = HeadOptions(device=device.type, seed=request.seed)
    results = []
    for model, tap in picked:
        cache_path = _cache_of(request, model)
        with FeatureCache(cache_path) as cache:
            labels = {s: cache.labels(s) for s in ("train", "test")}
            fit_rows, val_rows = validation_split(labels["train"], request.val_fraction, request.seed,
                                                  cache.official_val("train"))
            train, test = cache.read("train", tap).astype(np.float32), cache.read("test", tap).astype(np.float32)
            n_classes = len(cache.classes)
        X = standardised_tap(train, fit_rows, val_rows, test, device)  # the sweep's rule: the fit rows' statistics
        y = {"fit": labels["train"][fit_rows], "val": labels["train"][val_rows], "test": labels["test"]}
        y = {k: torch.from_numpy(v).to(device) for k, v in y.items()}
        row = {"model": model, "tap": tap}
        for head in ("logreg", "knn"):
            got = probe(head, X, y, n_classes, options)
            row.update({f"{head}_val_acc": got["val_acc"], f"{head}_test_acc": got["test_acc"]})
        results.append(row)
    checked = pd.DataFrame(results).merge(ok[["model", "tap", *request.score]], on=["model", "tap"])
    atomic_write(folder / "confirm.csv", checked.to_csv(index=False))
    taus = []
    for score in request.score:
        tau, _ = kendalltau(checked[score], checked["logreg_val_acc"], nan_policy="omit")
        taus.append({"score": score, "kendall_tau": float(tau), "taps": len(checked)})
        log(f"{score}: Kendall tau {tau:+.3f} against the logreg probe's validation accuracy on {len(checked)} taps")
    atomic_write(folder / "tau.csv", pd.DataFrame(taus).to_csv(index=False))


def _cache_of(request, model: str) -> Path:
    from featcache.extraction.config import cache_identities

    [identity] = cache_identities(_config(request, [model])).values()
    if not identity.path.exists():
        raise FeatcacheError(f"--confirm needs the cache of {model}, which --keep-caches removed: use --keep-caches "
                             f"all with --confirm")
    return identity.path
