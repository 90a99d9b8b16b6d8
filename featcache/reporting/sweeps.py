"""The report's sweep section: which layer transfers best, which pairs, how few shots suffice, k-NN, the top.

Flow: sweep folders (``RUNS/sweeps/*/table.csv``, ``fewshot.csv``) -> **sweeps** -> reporting.page.
Reads only the tables a sweep wrote (CSV, no code); draws with reporting.figures' helpers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featcache.fuse.heads import HEADS
from featcache.reporting.figures import _plt, png
from featcache.sweeping.tables import fewshot_best


def sweep_folders(runs_dir: Path) -> list[Path]:
    return sorted(p.parent for p in Path(runs_dir).glob("sweeps/*/table.csv"))


def sweep_section(folder: Path) -> dict:
    """Figures (PNG bytes) and tables (lists of dicts) of one sweep."""
    import pandas as pd

    table = pd.read_csv(folder / "table.csv")
    request = sweep_request(folder)  # read once: the weights and the taps' order
    out = {"name": folder.name, "n_rows": len(table), "random": request.get("weights") == "random",
           "dataset": _dataset_name(request), "backbones": request.get("backbones") or [],
           "best": table.iloc[0][["taps", "head", "val_acc", "test_acc"]].to_dict() if len(table) else None,
           "heads": list(dict.fromkeys(map(str, table["head"]))) if len(table) else []}
    order = network_order(request, table)
    singles = table[table["n_taps"] == 1]
    if len(singles):
        out["depth"] = depth(singles, order)
    pairs = table[table["n_taps"] == 2]
    if len(pairs):
        head = table.iloc[0]["head"]  # the head of the best row by validation
        out["pairs_head"] = head
        out["pairs"] = pair_heatmap(pairs[pairs["head"] == head], head, order, singles[singles["head"] == head])
    fewshot = folder / "fewshot.csv"
    if fewshot.exists():
        out["fewshot"] = fewshot_curve(pd.read_csv(fewshot), table)
    if "folds" not in table:  # a sweep table written before --cv: one split per seed
        table["folds"] = 1
    out["folds"] = int(table["folds"].max()) if len(table) else 1
    replicates = table["seeds"].fillna(1) * table["folds"].fillna(1) if "seeds" in table else table["folds"]
    out["seconds"] = float((table["fit_s"].fillna(0) * replicates).sum()) if "fit_s" in table else 0.0
    columns = ["taps", "head", "chosen", "val_acc", "test_acc", "test_acc_ci", "macro_f1", "width", "fit_s", "seeds",
               "folds"]
    neighbours = table["head"].map(lambda h: h in HEADS and HEADS[h].sweep == "neighbours").astype(bool)
    if "ties_best" in table and table["ties_best"].sum() > 1:  # said out loud: validation cannot choose among these
        out["tied"] = table[table["ties_best"].astype(bool)][["taps", "head", "val_acc", "width"]].to_dict("records")
    out["top"] = table[~neighbours].head(10)[columns].to_dict("records")
    out["knn"] = table[neighbours].head(10)[columns].to_dict("records")
    return out


def _dataset_name(request: dict) -> str:
    """The sweep's dataset as the report names it, from its sweep.json (the one rule: data.request's)."""
    from featcache.data.request import dataset_label

    where = request.get("data_dir")
    return dataset_label(str(request.get("dataset", "?")), where if isinstance(where, str) else None)


def dataset_suite(sweeps: list[dict]) -> list[dict]:
    """One row per dataset swept (several sweeps of one dataset: each its own row): the best tap and head by
    validation, and that row's test accuracy, which chose nothing."""
    return [{"dataset": sw["dataset"], "backbones": " + ".join(map(str, sw["backbones"])), "sweep": sw["name"],
             **sw["best"]} for sw in sweeps if sw.get("best")]


def network_order(request: dict, table) -> list[str]:
    """Every tap in network order, backbone by backbone: the sweep's own list (``taps`` of its sweep.json), then
    any tap the table names that the list lacks, in the table's order (the table itself is ranked by validation)."""
    listed = request.get("taps")
    listed = [t for t in listed if isinstance(t, str)] if isinstance(listed, list) else []
    return list(dict.fromkeys(listed + [t for taps in table["taps"] for t in taps.split("+")]))


def sweep_request(folder: Path) -> dict:
    """The sweep's sweep.json (plain JSON), or {} where it is missing or not a table."""
    try:
        request = json.loads((folder / "sweep.json").read_text())
    except (OSError, ValueError):
        return {}
    return request if isinstance(request, dict) else {}


def _bounded(acc, ci):
    """The error bars of accuracies ``acc`` with half-widths ``ci``, cut at 0 and 1 (an accuracy lies there)."""
    acc, ci = np.asarray(acc, float), np.asarray(ci, float)
    return np.vstack([np.minimum(ci, acc), np.minimum(ci, 1 - acc)])


def depth_lines(singles, order: list[str]) -> dict:
    """{"backbone · head": (each tap's depth in its backbone, 0 = its first tap, 1 = its last; its rows)}, the rows
    in network order. Relative depth, not the tap's index: backbones with 4 and 7 taps end at the same place."""
    backbone = singles["taps"].str.rsplit(":", n=1).str[0]
    singles = singles.assign(backbone=backbone, rank=singles["taps"].map(order.index))
    singles = singles.sort_values("rank", kind="stable")
    lines = {}
    for (name, head), rows in singles.groupby(["backbone", "head"], sort=False):
        own = [t for t in order if t.rsplit(":", 1)[0] == name]  # this backbone's taps, earliest first
        lines[f"{name} · {head}"] = ([own.index(t) / max(1, len(own) - 1) for t in rows["taps"]], rows)
    return lines


SMALL_MULTIPLES = 4  # more lines than this on one axes: a panel per backbone instead


def depth(singles, order: list[str]) -> bytes:
    """Validation accuracy of each tap alone, in network order: one line per backbone and head (a panel per
    backbone, its heads as lines, where one axes would hold more than four lines). Validation, not test: a
    reader picks a layer from this plot, and the test split never drives a choice."""
    plt = _plt()
    lines = depth_lines(singles, order)
    # one colour per backbone, one line style and marker per head: no two lines look alike
    backbones = list(dict.fromkeys(label.split(" · ")[0] for label in lines))
    heads = list(dict.fromkeys(label.split(" · ")[1] for label in lines))
    colours = plt.get_cmap("tab10" if len(backbones) <= 10 else "tab20")
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P"]
    apart = len(lines) > SMALL_MULTIPLES and len(backbones) > 1
    columns = min(3, len(backbones)) if apart else 1
    rows_n = -(-len(backbones) // columns) if apart else 1
    fig, axes = plt.subplots(rows_n, columns, figsize=(7.5 if not apart else 3.6 * columns, 3.2 if not apart
                                                           else 2.6 * rows_n), squeeze=False, sharey=True)
    for label, (x, rows) in lines.items():
        name, head = label.split(" · ")
        b, h = backbones.index(name), heads.index(head)
        ax = axes.flat[b] if apart else axes[0, 0]
        ci = rows["val_acc_ci"] if "val_acc_ci" in rows else np.zeros(len(rows))
        ax.errorbar(x, rows["val_acc"], yerr=_bounded(rows["val_acc"], ci), color=colours(b % colours.N),
                    linestyle=styles[h % len(styles)], marker=markers[h % len(markers)], capsize=2,
                    label=head if apart else label)
    for i, ax in enumerate(axes.flat):
        if apart and i >= len(backbones):
            ax.set_visible(False)
            continue
        ax.set_ylim(top=1.02)
        ax.set_xlim(-0.05, 1.05)
        if apart:
            ax.set_title(backbones[i], fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
    fig.supxlabel("depth of the tap in its backbone (0 = first tap, 1 = last)", fontsize=9)
    fig.supylabel("validation accuracy", fontsize=9)
    fig.suptitle("Which layer transfers best", fontsize=10)
    if not apart:
        axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return png(fig)


def pair_heatmap(pairs, head: str, order: list[str], singles=None) -> bytes:
    """Validation accuracy of every pair of taps (one head), as a symmetric matrix in network order; on its diagonal
    each tap alone (``singles``, the same head), where the sweep had it. Validation: a reader picks a pair here."""
    plt = _plt()
    named = {t for taps in pairs["taps"] for t in taps.split("+")}
    names = [t for t in order if t in named]
    where = {t: i for i, t in enumerate(names)}
    grid = np.full((len(names), len(names)), np.nan)
    for taps, acc in zip(pairs["taps"], pairs["val_acc"]):
        a, b = (where[t] for t in taps.split("+"))
        grid[a, b] = grid[b, a] = acc
    if singles is not None:
        for tap, acc in zip(singles["taps"], singles["val_acc"]):
            if tap in where:
                grid[where[tap], where[tap]] = acc
    fig, ax = plt.subplots(figsize=(0.45 * len(names) + 3, 0.45 * len(names) + 2))
    shown = ax.imshow(grid, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title(f"Pairs of taps, {head}: validation accuracy (diagonal: the tap alone)", fontsize=10)
    fig.colorbar(shown, ax=ax, shrink=0.8)
    return png(fig)


def fewshot_curve(fewshot, table) -> bytes:
    """Mean test accuracy against shots per class, with 95% intervals, for the best combination of each head."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    for head, (best, rows) in fewshot_best(fewshot, table).items():
        ax.errorbar(rows["shots"], rows["test_acc"], yerr=_bounded(rows["test_acc"], rows["test_acc_ci"]),
                    marker="o", capsize=3, label=f"{head} · {best}")
    ax.set_xscale("log")
    shots = sorted(int(k) for k in fewshot["shots"].unique())
    ax.set_xticks(shots, [str(k) for k in shots])  # the shots drawn, not powers of ten
    ax.minorticks_off()
    ax.set_xlabel("training images per class")
    ax.set_ylabel("test accuracy")
    ax.set_title("Few-shot", fontsize=10)
    ax.legend(fontsize=7)
    return png(fig)


def similarity_folders(runs_dir: Path) -> list[Path]:
    return sorted(p.parent for p in Path(runs_dir).glob("similarity/*/cka.csv"))


def is_similarity(folder: Path) -> bool:
    return (folder / "cka.csv").is_file() and folder.parent.name == "similarity"


def similarity_section(folder: Path) -> dict:
    """A ``featcache similarity`` folder: its CKA matrix as a heatmap and its least similar pairs."""
    import pandas as pd

    from featcache.data.safe import read_regular, regular_csv

    def csv(name: str, **options):
        return regular_csv(folder / name, name, 64 << 20, **options)

    matrix = csv("cka.csv", index_col=0)
    if list(matrix.index) != list(matrix.columns) or not np.isfinite(matrix.to_numpy(float)).all():
        raise ValueError("cka.csv is not a square matrix of numbers over the same taps")
    try:
        about = json.loads(read_regular(folder / "similarity.json", "similarity.json", 1 << 20))
    except (OSError, ValueError):
        about = {}
    about = about if isinstance(about, dict) else {}
    pairs = csv("pairs.csv") if (folder / "pairs.csv").is_file() else pd.DataFrame()
    title = f"{' + '.join(map(str, about.get('backbones') or [])) or 'taps'} on {about.get('dataset') or '?'}"
    return {"name": folder.name, "title": title, "random": about.get("weights") == "random",
            "debiased": bool(about.get("debiased")), "images": about.get("images"),
            "least": pairs.head(8).to_dict("records"), "heatmap": cka_heatmap(matrix)}


def cka_heatmap(matrix) -> bytes:
    """The CKA of every pair of taps, in network order: dark where two taps say different things."""
    plt = _plt()
    names = list(matrix.index)
    fig, ax = plt.subplots(figsize=(0.45 * len(names) + 3, 0.45 * len(names) + 2))
    shown = ax.imshow(matrix.to_numpy(float), cmap="magma", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title("Linear CKA between taps (1: the same up to rotation and scale)", fontsize=10)
    fig.colorbar(shown, ax=ax, shrink=0.8)
    return png(fig)
