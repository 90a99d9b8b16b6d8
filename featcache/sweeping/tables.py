"""A sweep's rows and tables: ``rows.jsonl`` (one evaluation a line, the resume's record) and the tables made of it.

A row is of one of two kinds: a probe's (a head fitted, its accuracies; no ``kind`` key, as before kinds existed)
or a scorer's (``"kind": "score"``, its value under ``score``); ``table.csv`` holds the probes, ``scores.csv``
the scores.

Flow: sweep/run -> **tables** -> ``table.csv``, ``fewshot.csv`` (read by reporting.sweeps). A row is keyed by
(seed, taps, head, shots, repeat); the table averages a (combination, head) over seeds with a 95% interval and
ranks on validation accuracy alone.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from featcache import torchrun
from featcache.data.safe import read_own
from featcache.files import atomic_write
from featcache.sweeping.scorers import SCORERS


def public(job: dict) -> dict:
    row = {"seed": job["seed"], "taps": [str(r) for r in job["refs"]], "head": job["head"], "shots": job["shots"],
           "repeat": job["repeat"], **({"fold": job["fold"]} if job.get("fold") is not None else {})}
    return {**row, "kind": "score"} if job.get("kind") == "score" else row


def row_key(job: dict) -> str:
    """A row's identity: (seed, taps, head, shots, repeat), ``score`` for a scorer's row and the fold of a ``--cv``
    row (a probe's row of one validation split keeps the key it had before rows had kinds or folds, so existing
    sweep folders resume)."""
    row = public(job) if "refs" in job else job
    key = [row["seed"], row["taps"], row["head"], row["shots"], row["repeat"]]
    key += ["score"] if row.get("kind") == "score" else []
    key += ["fold", row["fold"]] if row.get("fold") is not None else []
    return json.dumps(key)


def finished(folder: Path) -> set[str]:
    """Keys of the evaluations already in rows.jsonl (a killed torchrun job's rank files are folded into it first:
    :func:`fold_ranks`). A line cut short by an interruption is dropped from the file, so that the rows appended
    next start on a line of their own."""
    return {key for key, _ in _good_lines(folder / "rows.jsonl")}


def _good_lines(path: Path) -> list[tuple[str, str]]:
    """(key, line) of every complete row of one rows file, which is rewritten without the others."""
    if not os.path.lexists(path):
        return []
    text = read_own(path, "sweep rows file").decode("utf-8", errors="replace")  # damaged bytes: bad lines, no crash
    good = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
            if _complete(row):
                good.append((row_key(row), line))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue
    kept = "".join(line + "\n" for _, line in good)
    if kept != text:
        atomic_write(path, kept)
    return good


def fold_ranks(folder: Path, order: dict[str, int]) -> int:
    """Fold a torchrun job's rank rows files into rows.jsonl (:func:`featcache.torchrun.fold`), in the order one
    process evaluates the rows (``order``: row key -> position)."""
    return torchrun.fold(folder, _good_lines, order)


PROBE_VALUES = ("val_acc", "test_acc", "macro_f1", "fit_s", "width")


def _complete(row) -> bool:
    """A row the tables can count: its key, and numbers where its kind has them (a row with its keys but no
    values is dropped, and evaluated again, rather than tabled as NaN)."""
    if not isinstance(row, dict):
        return False
    values = ("score", "fit_s", "width") if row.get("kind") == "score" else PROBE_VALUES
    if row.get("kind") == "score" and row.get("head") in SCORERS and SCORERS[row["head"]].parts:
        parts = row.get("parts")  # a score with parts: combined over the combinations when tabled
        values = ("fit_s", "width")
        if not (isinstance(parts, list) and len(parts) == len(SCORERS[row["head"]].parts)
                and all(isinstance(x, (int, float)) and np.isfinite(x) for x in parts)):
            return False
    return all(isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)
                                         and np.isfinite(row[k]) for k in values)


def interval(values) -> float:
    """Half-width of the 95% interval of the mean (Student's t); 0 for a single value."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return 0.0
    return float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))


def read_rows(folder: Path) -> list[dict]:
    """Every evaluation in the folder's rows.jsonl."""
    text = read_own(folder / "rows.jsonl", "sweep rows file").decode("utf-8", errors="replace")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def tables(rows: list[dict], keys: list | None = None):
    """(table, fewshot) of ``rows`` (only those of ``keys``, a request's evaluations in the order one process
    evaluates them: a sweep folder also keeps what earlier requests on the same caches and options evaluated, for
    them to reuse). The rows are taken in the order of ``keys``, not of the file, so that a resumed sweep, or one
    whose rows came from several torchrun ranks, orders its ties as one uninterrupted process does."""
    import pandas as pd

    seen: set[str] = set()  # a row is counted once, however many times a file holds it
    mine = []
    position = None if keys is None else {key: i for i, key in enumerate(keys)}
    for row in rows:
        key = row_key(row)
        if key not in seen and (position is None or key in position):
            seen.add(key)
            mine.append(row)
    if position is not None:
        mine.sort(key=lambda row: position[row_key(row)])
    scores = score_table([r for r in mine if r.get("kind") == "score"])
    probes = [r for r in mine if r.get("kind") != "score"]
    frame = pd.DataFrame(probes) if probes else pd.DataFrame(columns=PROBE_COLUMNS)
    frame["taps"] = frame["taps"].map("+".join)
    frame["chosen"] = frame["chosen"].map(lambda c: json.dumps(c, sort_keys=True))
    full = frame[frame["shots"] == 0]
    folded = "fold" in full and full["fold"].notna().any()
    if folded:  # --cv: one candidate chosen per combination on the mean over every fold
        full = cross_validated(full)
    table = full.groupby(["taps", "head"], sort=False).agg(
        n_taps=("taps", lambda t: t.iloc[0].count("+") + 1), width=("width", "first"),
        chosen=("chosen", lambda c: Counter(c).most_common(1)[0][0]),  # the most frequent; ties: the first seed's
        val_acc=("val_acc", "mean"), val_acc_ci=("val_acc", interval), test_acc=("test_acc", "mean"),
        test_acc_ci=("test_acc", interval), macro_f1=("macro_f1", "mean"), fit_s=("fit_s", "mean"),
        seeds=("seed", "nunique")).reset_index()
    # replicates: seeds, or with --cv seeds x folds; the intervals are over them
    table["folds"] = full.groupby(["taps", "head"], sort=False)["fold"].nunique().to_numpy() if folded else 1
    # ranked on validation only; ties go to the cheaper model: fewer columns, then fewer backbones, then the order
    # asked (network order: earlier taps first) -- never to test
    table["n_backbones"] = table["taps"].map(lambda t: len({tap.rsplit(":", 1)[0] for tap in t.split("+")}))
    table = table.sort_values(["val_acc", "width", "n_backbones"], ascending=[False, True, True],
                              kind="stable").reset_index(drop=True)
    table["ties_best"] = ties_best(table)
    few = frame[frame["shots"] > 0]
    fewshot = few.groupby(["taps", "head", "shots"], sort=False).agg(
        test_acc=("test_acc", "mean"), test_acc_ci=("test_acc", interval), draws=("test_acc", "size")).reset_index()
    return table, fewshot, scores


def cross_validated(full):
    """``--cv`` rows with each fold's figures replaced by those of the candidate with the best mean validation
    accuracy over every fold of the combination (the first of equals, in the grid's order), as scikit-learn's
    GridSearchCV chooses: a fold's own favourite is not the choice. Its test accuracy is each fold model's at that
    candidate (rows of ``--cv`` carry every candidate's test figures)."""
    import pandas as pd

    out = []
    for _, rows in full.groupby(["taps", "head"], sort=False):
        tried: dict[str, list] = {}  # candidate -> [(row, val, test, f1)]
        for i, row in enumerate(rows.itertuples()):
            for params, val, test, f1 in row.candidates:
                tried.setdefault(json.dumps(params, sort_keys=True), []).append((i, val, test, f1))
        whole = {c: v for c, v in tried.items() if len(v) == len(rows)} or tried  # tried on every fold
        best = max(whole, key=lambda c: np.mean([v for _, v, _, _ in whole[c]]))  # the first of equals
        chosen = rows.copy()
        figures = {i: (val, test, f1) for i, val, test, f1 in whole[best]}
        chosen["chosen"] = best
        for k, name in enumerate(("val_acc", "test_acc", "macro_f1")):
            chosen[name] = [figures.get(i, (np.nan,) * 3)[k] for i in range(len(rows))]
        out.append(chosen)
    return pd.concat(out) if out else full


PROBE_COLUMNS = ["seed", "taps", "head", "shots", "repeat", "width", "chosen", "val_acc", "test_acc", "macro_f1",
                 "fit_s"]  # the rows the probes write (--head none: none, and an empty table)


def ties_best(table) -> np.ndarray:
    """Which rows tie with the best on validation: the same mean validation accuracy, or with several seeds within
    the best row's 95% interval of it (what the seeds cannot tell apart)."""
    if not len(table):
        return np.zeros(0, dtype=bool)
    best = table.iloc[0]
    margin = best["val_acc_ci"] if replicates(best) > 1 else 0.0
    return (table["val_acc"] >= best["val_acc"] - margin - 1e-12).to_numpy()


def tie_line(table) -> str | None:
    """The closing line that says a tie out loud, or None when the best stands alone."""
    tied = int(table["ties_best"].sum()) if "ties_best" in table else 0
    if tied < 2:
        return None
    cv = table.iloc[0].get("folds", 1) > 1
    over = "folds" if cv else "seeds"
    within = f"within its 95% interval over the {over}" if replicates(table.iloc[0]) > 1 else "exactly"
    remedies = ["more validation images", *([] if cv else ["--cv 5"]), "more --seeds"]
    return (f"{tied} of {len(table)} (combination, head) rows tie with the best on validation "
            f"({table.iloc[0]['val_acc']:.4f}, {within}): the first listed is the cheapest of them (fewest columns, "
            f"then fewest backbones, then earliest taps); table.csv marks them all in ties_best. With so many ties "
            f"validation cannot choose between them; {', '.join(remedies[:-1])} or {remedies[-1]} would tell them "
            f"apart.")


def replicates(row) -> int:
    """How many replicates a table row averages: its seeds, times its folds with ``--cv``."""
    return int(row["seeds"]) * int(row.get("folds", 1))


def score_table(rows: list[dict]):
    """(taps, score) -> its mean over seeds, the width and the seconds, best first within each score."""
    import pandas as pd

    if not rows:
        return pd.DataFrame(columns=["taps", "score", "value", "n_taps", "width", "seeds", "fit_s"])
    frame = pd.DataFrame(rows)
    if "parts" in frame:  # NCTI, ETran: combined over this table's combinations, seed by seed
        from featcache.sweeping.scorers import combined

        frame["score"] = frame["score"].astype(float) if "score" in frame else np.nan
        for (_, head), group in frame.groupby(["seed", "head"], sort=False):
            if head in SCORERS and SCORERS[head].parts:
                frame.loc[group.index, "score"] = combined(head, list(group["parts"]))
    frame["taps"] = frame["taps"].map("+".join)
    table = frame.groupby(["taps", "head"], sort=False).agg(
        value=("score", "mean"), n_taps=("taps", lambda t: t.iloc[0].count("+") + 1), width=("width", "first"),
        seeds=("seed", "nunique"), fit_s=("fit_s", "mean")).reset_index().rename(columns={"head": "score"})
    better = table["score"].map(lambda s: 1.0 if s not in SCORERS or SCORERS[s].larger_is_better else -1.0)
    table = table.assign(_rank=-better * table["value"]).sort_values(["score", "_rank", "width"], kind="stable")
    return table.drop(columns="_rank").reset_index(drop=True)


def score_lines(scores, n: int = 5) -> list[str]:
    lines = []
    for name, rows in scores.groupby("score", sort=False):
        lines.append(f"{name}: the best {min(n, len(rows))} of {len(rows)} combinations by this score (scores.csv):")
        lines += [f"  {row.value:12.5g}  {row.taps}" for row in rows.head(n).itertuples()]
    return lines


def write_tables(folder: Path, table, fewshot, scores=None) -> None:
    atomic_write(folder / "table.csv", table.to_csv(index=False))
    if len(fewshot):
        atomic_write(folder / "fewshot.csv", fewshot.to_csv(index=False))
    if scores is not None and len(scores):
        atomic_write(folder / "scores.csv", scores.to_csv(index=False))
    elif scores is not None:
        (folder / "scores.csv").unlink(missing_ok=True)  # an earlier request's: this one asked for no score
    try:
        table.to_parquet(folder / "table.parquet", index=False)
    except (ImportError, ValueError):  # no pyarrow / fastparquet here: the CSV holds the same table
        pass


def fewshot_best(fewshot, table) -> dict:
    """head -> (taps, its few-shot rows by shots): each head's best combination on full-data validation
    (the table's order), so the few-shot figures shown never pick a combination on test."""
    out = {}
    for head, rows in fewshot.groupby("head", sort=False):
        ranked = table[table["head"] == head]
        best = ranked.iloc[0]["taps"] if len(ranked) else rows.iloc[0]["taps"]
        out[head] = (best, rows[rows["taps"] == best].sort_values("shots"))
    return out


def fewshot_lines(fewshot, table) -> list[str]:
    if not len(fewshot):
        return []
    lines = [f"few-shot test accuracy, mean ±95% over {int(fewshot['draws'].max())} draws, for each head's best "
             "combination on validation (fewshot.csv: every combination):"]
    for head, (taps, rows) in fewshot_best(fewshot, table).items():
        cells = "  ".join(f"{int(r.shots)} shot{'s' if r.shots > 1 else ''} {r.test_acc:.4f}±{r.test_acc_ci:.4f}"
                          for r in rows.itertuples())
        lines.append(f"  {head:<7} {cells}  {taps}")
    return lines


def top_lines(table, n: int = 10) -> list[str]:
    if not len(table):  # --head none: the scores' lines alone
        return []
    cv = int(table["folds"].max()) if "folds" in table else 1
    lines = [f"{'cv' if cv > 1 else 'val':>6} {'±95%':>6} {'test':>6} {'±95%':>6}  {'head':<7} {'chosen':<24} taps"]
    for _, row in table.head(n).iterrows():
        several = replicates(row) > 1  # one replicate: no interval, not ±0
        ci = {k: f"{row[k]:6.4f}" if several else f"{'-':>6}" for k in ("val_acc_ci", "test_acc_ci")}
        lines.append(f"{row.val_acc:6.4f} {ci['val_acc_ci']} {row.test_acc:6.4f} {ci['test_acc_ci']}  {row['head']:<7} "
                     f"{row.chosen[:24]:<24} {row.taps}")
    tie = tie_line(table)
    return lines + ([tie] if tie else [])
