"""``featcache choose``: screen every tap, confirm the survivors by successive halving, decide from paired
predictions.

Stage 9 (choosing: request -> **run** -> probes / decide / answer). The funnel:

1. **screen**: ``rank``'s machinery extracts every matched model (a few at a time, caches kept) and scores every
   tap with ``--score``; beside the scores, cheap baselines: each tap's k-NN accuracy on the held-out share
   (``--val-fraction``), its model's parameters and, with ImageNet weights, their reported top-1.
2. **probe** (round 1): the taps each score and baseline ranks highest, taken in turn, as many as a third of the
   budget pays for (all of them where it allows), each with the batched logreg probe on the held-out share
   (two C). These accuracies are what each score is checked against (the trust table).
3. **confirm** (round 2): the better half, and fused pairs of the best four (``--singles``: none), with logreg
   (the full C grid) and k-NN (k 10, 20) on three folds of train; the pairs in order of promise, good alone
   and different from each other (linear CKA of their taps, :mod:`~featcache.sweeping.similarity`), so a small
   budget keeps the most promising.
4. **decide** (round 3): the better half of those (candidate, head) on ``--cv`` folds with the finer grids:
   every training image predicted once, out of fold, by every finalist, so the comparison is paired. The
   recommendation, P(best) by the bootstrap over images, the tied set by McNemar's exact test, the fast choice
   (:mod:`~featcache.choosing.decide`); then the recommendation alone is refitted on all of train and scored
   on test, once. Test labels are read for nothing else.

A probe fit is one head on one fold of one candidate, its whole grid; ``--budget`` caps them (or the seconds
they take). The folder ``runs/choices/NAME`` holds ``answer.json`` (the decision), ``candidates.csv`` (every
candidate of every round), ``trust.csv`` and ``funnel.csv``; the screen's ranking stays in ``runs/ranks/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np

from featcache import torchrun
from featcache.choosing.decide import decide, trust
from featcache.choosing.probes import Candidate, Features, evaluate, holdout_knn, scored_on_test
from featcache.choosing.request import parse_budget
from featcache.errors import DataError, FeatcacheError, NothingWorked
from featcache.files import atomic_write, lock
from featcache.fuse.heads import C_GRID
from featcache.sweeping.knn import KS
from featcache.sweeping.pairs import pair_cka
from featcache.sweeping.probes import batched

FIRST_C = (0.1, 1.0)
FINE_C = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
CONFIRM_FOLDS = 3
PAIRED_FROM = 4  # round 2: the best this many taps of round 1 and their fused pairs
FIRST_ROUND = 40  # round 1 probes at most this many taps (where --budget gives no number)
FINALISTS = 8


def choose(request, log=print, progress: bool = True):
    """Screen, confirm and decide; write the choice's folder and return its :class:`~featcache.choosing.answer.
    Choice`."""
    import pandas as pd

    from featcache.choosing.answer import Choice
    from featcache.ranking.run import rank, read_rows

    r = torchrun.current()
    torchrun.init(r)
    if r.world > 1:  # a GPU per rank: cuda:LOCAL_RANK becomes the one "cuda" names
        torchrun.device_for(r, request.device)
    log, progress = (log, progress) if r.main else (_quiet, False)  # rank 0 speaks for the job
    request = request.config()
    fits, seconds = parse_budget(request.budget)
    said: list[str] = []
    try:
        ranking = rank(request.rank_request(), log=said.append, progress=progress)
    except NothingWorked:
        for line in said:
            if line.startswith("  "):
                log(line)
        raise
    for line in said:
        if line.startswith("warning:") or "cannot tell these taps apart" in line:
            log(line)
    table = pd.read_csv(ranking / "table.csv")
    ok = table[(table["status"] == "ok") & (table["tap"] != "logits")].reset_index(drop=True)
    rows = {r["model"]: r for r in read_rows(ranking).values() if r["status"] == "ok"}
    screen = hashlib.sha256((ranking / "table.csv").read_bytes()).hexdigest()
    folder = _folder(request, sorted(rows))
    if (earlier := _served(folder, screen)) is not None:  # the same request on the same screen: its answer
        for line in earlier.lines():
            log(line)
        return earlier
    failed = sorted(set(table.loc[table["status"] != "ok", "model"]))
    data = Features({m: Path(rows[m]["cache"]) for m in ok["model"].unique()})
    if len(np.unique(data.y)) < 2:
        raise DataError("the training images hold one class: choosing needs at least two")
    from featcache.fuse.evaluate import check_cv, cv_folds, validation_split

    check_cv(data.y, request.cv)
    check_cv(data.y, CONFIRM_FOLDS)
    device = _device(request.device)
    speed = {m: rows[m]["images_per_s"] for m in rows}
    params = {m: rows[m]["params"] for m in rows}
    refs = [(m, t) for m, t in zip(ok["model"], ok["tap"])]
    fit_rows, val_rows = validation_split(data.y, request.val_fraction, request.seed, data.official)
    started = time.perf_counter()

    # screen: the k-NN baseline of every tap on the held-out share
    knn = _shared(r, refs, lambda mine: {ref: holdout_knn(ref, data, fit_rows, val_rows, device) for ref in mine})
    orders = {s: _order(ok[s].to_numpy(float), refs) for s in request.score}
    orders["k-NN accuracy"] = sorted(refs, key=lambda r: -knn[r])
    first_n = min(len(refs), FIRST_ROUND if fits is None else max(2, fits // 3))
    survivors = _round_robin(list(orders.values()), first_n)

    # round 1: logreg, two C, on the held-out share
    one = _evaluated(r, [Candidate((ref,)) for ref in survivors], ["logreg"], data, [(fit_rows, val_rows)], device,
                     {"logreg": FIRST_C})
    spent = len(survivors)
    per_fit = (time.perf_counter() - started) / max(spent, 1)

    def left() -> int:  # the fits the budget still pays for (seconds: at round 1's pace, rank 0's clock for every rank)
        if fits is not None:
            return fits - spent
        if seconds is None:
            return 10 ** 9
        return torchrun.agree(r, max(int((seconds - (time.perf_counter() - started)) / max(per_fit, 1e-9)), 0))

    first_acc = {c.taps[0]: one[(c, "logreg")]["accuracy"] for c in (Candidate((ref,)) for ref in survivors)}

    # round 2: the best taps and their fused pairs, logreg and k-NN on three folds
    ranked = sorted(survivors, key=lambda ref: (-first_acc[ref], -(speed.get(ref[0]) or 0)))
    kept = ranked[:max(2, min(math.ceil(len(ranked) / 2), PAIRED_FROM))]
    cka = {} if request.singles else torchrun.on_main(r, lambda: pair_cka({ref: data.train(ref) for ref in kept},
                                                                           fit_rows, kept, most=None))
    cka = torchrun.agree(r, cka)
    pairs = [] if request.singles else sorted(  # in order of promise: good alone (within a point), then different
        (Candidate((a, b)) for i, a in enumerate(kept) for b in kept[i + 1:]),
        key=lambda c: (-round(sum(first_acc[ref] for ref in c.taps) / 2, 2), cka[c.taps]))
    second_cost = 2 * CONFIRM_FOLDS
    room = max(2, (left() - 2 * request.cv) // second_cost)
    cramped = room * second_cost + 2 * request.cv > left()
    pairs = pairs[:max(0, room - len(kept))]  # the budget's share: the weakest pairs go first, then singles
    second = [Candidate((ref,)) for ref in kept[:max(2, room - len(pairs))]] + pairs
    folds2 = cv_folds(data.y, CONFIRM_FOLDS, request.seed)
    two = _evaluated(r, second, ["logreg", "knn"], data, folds2, device, {"logreg": C_GRID, "knn": KS[:2]})
    spent += len(second) * second_cost
    cramped = cramped or left() < 2 * request.cv
    entries = sorted(two, key=lambda e: (-two[e]["accuracy"], -_speed(e[0], speed)))
    n_final = max(2, min(math.ceil(len(entries) / 2), FINALISTS, left() // request.cv))
    finalists = entries[:n_final]

    # round 3: decide on --cv folds, the finer grids, every training image predicted once
    folds3 = cv_folds(data.y, request.cv, request.seed)
    three = {}
    for head in ("logreg", "knn"):
        mine = [c for c, h in finalists if h == head]
        if mine:
            three.update(_evaluated(r, mine, [head], data, folds3, device, {"logreg": FINE_C, "knn": KS}))
    spent += len(finalists) * request.cv

    def settle():  # rank 0: the decision from round 3's paired predictions, test scored once, the choice's folder
        correct = np.stack([three[e]["predicted"] == data.y for e in finalists])
        chance = float(np.bincount(data.y).max() / len(data.y))
        verdict = decide(correct, np.array([_speed(c, speed) for c, _ in finalists]),
                         np.array([_params(c, params) for c, _ in finalists], dtype=float), chance, request.seed)
        best = finalists[verdict.recommended]
        test_accuracy = scored_on_test(best, three[best]["chosen"], data, device)
        probe_seconds = time.perf_counter() - started

        trust_rows = trust(_screen_values(request, ok, survivors, knn, params),
                           np.array([first_acc[ref] for ref in survivors]), set(request.score))
        funnel = [
            {"round": "screen", "candidates": len(refs), "kept": len(survivors), "fits": 0,
             "how": f"{', '.join(request.score)} and k-NN accuracy on every tap; the best of each, in turn"},
            {"round": "probe", "candidates": len(survivors), "kept": len(kept), "fits": len(survivors),
             "how": f"logreg, C 0.1 and 1, on the held-out share; the best {len(kept)} kept"},
            {"round": "confirm", "candidates": len(second), "kept": len(finalists), "fits": len(second) * second_cost,
             "how": f"logreg (C {', '.join(f'{c:g}' for c in C_GRID)}) and k-NN (k 10, 20) on {CONFIRM_FOLDS} folds; "
                    f"the best {len(second) - len(pairs)} taps and {len(pairs)} fused pair(s) of them; the better "
                    f"half of (candidate, head) kept"},
            {"round": "decide", "candidates": len(finalists), "kept": len(verdict.tied),
             "fits": len(finalists) * request.cv,
             "how": f"logreg (7 C) and k-NN (k {', '.join(map(str, KS))}) on {request.cv} folds, every training image "
                    f"predicted once; tied: McNemar p >= 0.05 against the best"},
        ]
        candidates = _candidate_table(one, knn, two, finalists, three, verdict, speed, params, cka)
        answer = _answer(request, ranking, folder, finalists, three, verdict, test_accuracy, speed, params, chance,
                         data, spent, probe_seconds, cramped, failed, len(refs), cka)
        answer["screen"] = screen
        folder.mkdir(parents=True, exist_ok=True)
        with lock(folder.parent / f".{folder.name}.lock"):
            atomic_write(folder / "candidates.csv", pd.DataFrame(candidates).to_csv(index=False))
            atomic_write(folder / "trust.csv", pd.DataFrame(trust_rows).to_csv(index=False))
            atomic_write(folder / "funnel.csv", pd.DataFrame(funnel).to_csv(index=False))
            atomic_write(folder / "answer.json", json.dumps(answer, indent=1, default=str))  # paths as text
        choice = Choice.load(folder)
        for line in choice.lines():
            log(line)
        return choice

    settled = torchrun.on_main(r, settle)
    if settled is None:  # another rank: rank 0 wrote the choice
        return Choice.load(folder)
    return settled


def _quiet(message: str) -> None:
    pass


def _shared(r, items: list, work) -> dict:
    """``work(share)`` -> {item: result} on each rank's share of ``items``, merged on every rank in the order of
    ``items`` (one process's order: ties are broken by it)."""
    merged = {}
    for part in torchrun.gather(r, work(torchrun.share(items, r))):
        merged.update(part)
    return {item: merged[item] for item in items}


def _evaluated(r, candidates: list, heads: list[str], *args) -> dict:
    """:func:`~featcache.choosing.probes.evaluate`, the results on every rank in one process's order. k-NN alone: each
    rank its share of the candidates (a candidate's k-NN depends on nothing else). With the batched logreg, rank 0
    evaluates them all and hands the results on: a logreg's numbers depend on the batch it is solved in, and a
    round's folds batch its candidates each their own way, so no share of them gives one process's numbers."""
    if any(head in batched() for head in heads):
        return torchrun.agree(r, torchrun.on_main(r, lambda: evaluate(candidates, heads, *args)))
    merged = {}
    for part in torchrun.gather(r, evaluate(mine, heads, *args) if (mine := torchrun.share(candidates, r)) else {}):
        merged.update(part)
    return {(c, h): merged[(c, h)] for c in candidates for h in heads}


def _served(folder: Path, screen: str):
    """An earlier choice of this request whose screen (the ranking's table) is byte for byte today's, or None:
    every number after the screen follows from it and the request, so it is served, not probed again."""
    from featcache.choosing.answer import Choice

    if not (folder / "answer.json").is_file():
        return None
    try:
        earlier = Choice.load(folder, served=True)
    except (FeatcacheError, OSError, ValueError):
        return None  # damaged or foreign: choose again, and the new answer replaces it
    return earlier if earlier.answer.get("screen") == screen else None


def _device(name: str):
    from featcache.device import resolve_device

    return resolve_device(name)


def _order(values: np.ndarray, refs: list) -> list:
    """The taps best first by a score (its missing values last)."""
    keyed = [(-(v if np.isfinite(v) else -np.inf), i) for i, v in enumerate(values)]
    return [refs[i] for _, i in sorted(keyed)]


def _round_robin(orders: list[list], n: int) -> list:
    """The first ``n`` distinct taps taking each order's best not yet taken in turn: every score's and
    baseline's first choice is probed (where ``n`` allows), so each can be checked."""
    out: list = []
    position = [0] * len(orders)
    while len(out) < n:
        moved = False
        for k, order in enumerate(orders):
            while position[k] < len(order) and order[position[k]] in out:
                position[k] += 1
            if position[k] < len(order) and len(out) < n:
                out.append(order[position[k]])
                moved = True
        if not moved:
            break
    return out


def _speed(candidate: Candidate, speed: dict) -> float:
    """Images per second of a candidate's backbones run one after the other (each image through each)."""
    rates = [speed.get(m) for m in candidate.models]
    if any(not r for r in rates):
        return float("nan")
    return 1.0 / sum(1.0 / r for r in rates)


def _params(candidate: Candidate, params: dict) -> float:
    values = [params.get(m) for m in candidate.models]
    return float("nan") if any(v is None for v in values) else float(sum(values))


def _screen_values(request, ok, survivors: list, knn: dict, params: dict) -> dict:
    """Each score's and baseline's value of the round-1 taps, in their order."""
    from featcache.backbones.sources import top1_of

    where = {(m, t): i for i, (m, t) in enumerate(zip(ok["model"], ok["tap"]))}
    values = {s: np.array([ok[s].iloc[where[r]] for r in survivors], dtype=float) for s in request.score}
    values["model size"] = np.array([params.get(m) or np.nan for m, _ in survivors], dtype=float)
    if request.weights == "imagenet":  # the default weights' own report; meaningless for random or other weights
        top1 = {m: top1_of(m) for m, _ in survivors}
        values["ImageNet top-1"] = np.array([np.nan if top1[m] is None else top1[m] for m, _ in survivors])
    values["k-NN accuracy"] = np.array([knn[r] for r in survivors])
    return values


def _candidate_table(one, knn, two, finalists, three, verdict, speed, params, cka) -> list[dict]:
    rows = []
    for (c, h), got in one.items():
        rows.append({"candidate": c.label, "head": h, "round": "probe", "accuracy": got["accuracy"],
                     "chosen": json.dumps({"C": got["chosen"]}), "knn_screen": knn[c.taps[0]],
                     "images_per_s": _speed(c, speed), "params": _params(c, params)})
    for (c, h), got in two.items():
        rows.append({"candidate": c.label, "head": h, "round": "confirm", "accuracy": got["accuracy"],
                     "chosen": json.dumps({"C" if h == "logreg" else "k": got["chosen"]}),
                     "images_per_s": _speed(c, speed), "params": _params(c, params), "cka": cka.get(c.taps)})
    for i, (c, h) in enumerate(finalists):
        got = three[(c, h)]
        rows.append({"candidate": c.label, "head": h, "round": "decide", "accuracy": got["accuracy"],
                     "chosen": json.dumps({"C" if h == "logreg" else "k": got["chosen"]}),
                     "p_best": float(verdict.p_best[i]), "p_value": float(verdict.p_values[i]),
                     "tied": i in verdict.tied, "recommended": i == verdict.recommended, "fast": i == verdict.fast,
                     "images_per_s": _speed(c, speed), "params": _params(c, params), "cka": cka.get(c.taps)})
    return rows


def _folder(request, models: list[str]) -> Path:
    """runs/choices/NAME: the dataset's key and a hash of everything that changes the answer (the ranking's rule,
    with the funnel's own settings)."""
    from featcache.ranking.run import folder_of

    return folder_of(request, models, "choices", budget=request.budget, cv=request.cv, singles=request.singles)


def _answer(request, ranking: Path, folder: Path, finalists, three, verdict, test_accuracy: float, speed, params,
            chance: float, data: Features, fits: int, seconds: float, cramped: bool, failed: list,
            screened: int, cka: dict) -> dict:
    def entry(i: int) -> dict:
        c, h = finalists[i]
        return {"candidate": c.label, "backbones": c.models, "taps": [f"{m}:{t}" for m, t in c.taps], "head": h,
                "params": {"C" if h == "logreg" else "k": three[(c, h)]["chosen"]},
                "cv_accuracy": float(verdict.accuracy[i]), "p_best": float(verdict.p_best[i]),
                "p_value": float(verdict.p_values[i]), "images_per_s": _speed(c, speed),
                "parameters": _params(c, params), **({"cka": cka[c.taps]} if c.taps in cka else {})}

    recommended = {**entry(verdict.recommended), "interval": list(verdict.interval), "test_accuracy": test_accuracy}
    fast = {**entry(verdict.fast), "gives_up": float(verdict.accuracy[verdict.recommended] -
                                                      verdict.accuracy[verdict.fast])}
    return {"kind": "choice", "dataset": dataset_name(request), "classes": len(data.classes),
            "train_images": len(data.y), "test_images": len(data.y_test), "folds": request.cv,
            "weights": request.weights, "recommended": recommended, "fast": fast,
            "tied": [entry(i) for i in verdict.tied], "finalists": [entry(i) for i in range(len(finalists))],
            "beats_chance": bool(verdict.beats_chance), "chance": chance, "chance_p": verdict.chance_p,
            "fits": fits, "probe_seconds": seconds, "budget": request.budget, "cramped": cramped,
            "screened_taps": screened, "failed_models": failed, "ranking": str(ranking),
            "scores": list(request.score), "request": dataclasses.asdict(request)}


def dataset_name(request) -> str:
    data = request.data_request()
    return f"{data.name}" + (f" ({request.data_dir})" if request.data_dir else "")

