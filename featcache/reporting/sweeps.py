"""The report's sweep section: which layer transfers best, which pairs, how few shots suffice, k-NN, the top.

Flow: sweep folders (``RUNS/sweeps/*/table.csv``, ``fewshot.csv``) -> **sweeps** -> reporting.page.
Reads only the tables a sweep wrote (CSV, no code); draws with reporting.figures' helpers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.reporting.figures import _plt, png


def sweep_folders(runs_dir: Path) -> list[Path]:
    return sorted(p.parent for p in Path(runs_dir).glob("sweeps/*/table.csv"))


def sweep_section(folder: Path) -> dict:
    """Figures (PNG bytes) and tables (lists of dicts) of one sweep."""
    import pandas as pd

    table = pd.read_csv(folder / "table.csv")
    out = {"name": folder.name, "n_rows": len(table)}
    singles = table[table["n_taps"] == 1]
    if len(singles):
        out["depth"] = depth(singles)
    pairs = table[table["n_taps"] == 2]
    if len(pairs):
        head = table.iloc[0]["head"]  # the head of the best row by validation
        out["pairs"] = pair_heatmap(pairs[pairs["head"] == head], head)
    fewshot = folder / "fewshot.csv"
    if fewshot.exists():
        out["fewshot"] = fewshot_curve(pd.read_csv(fewshot), table)
    columns = ["taps", "head", "chosen", "val_acc", "test_acc", "test_acc_ci", "macro_f1", "width", "fit_s"]
    out["top"] = table[table["head"] != "knn"].head(10)[columns].to_dict("records")
    out["knn"] = table[table["head"] == "knn"].head(10)[columns].to_dict("records")
    return out


def depth(singles) -> bytes:
    """Test accuracy of each tap alone, in network order: one line per backbone and head."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    singles = singles.assign(backbone=singles["taps"].str.rsplit(":", n=1).str[0],
                             tap=singles["taps"].str.rsplit(":", n=1).str[1])
    for (backbone, head), rows in singles.groupby(["backbone", "head"], sort=False):
        ax.errorbar(np.arange(1, len(rows) + 1), rows["test_acc"], yerr=rows["test_acc_ci"], marker="o", capsize=2,
                    label=f"{backbone} · {head}")
    ax.set_xlabel("tap, in network order (1 = earliest)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Which layer transfers best", fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, loc="lower right")
    return png(fig)


def pair_heatmap(pairs, head: str) -> bytes:
    """Test accuracy of every pair of taps (one head), as a symmetric matrix."""
    plt = _plt()
    names = list(dict.fromkeys(t for taps in pairs["taps"] for t in taps.split("+")))
    grid = np.full((len(names), len(names)), np.nan)
    for taps, acc in zip(pairs["taps"], pairs["test_acc"]):
        a, b = (names.index(t) for t in taps.split("+"))
        grid[a, b] = grid[b, a] = acc
    fig, ax = plt.subplots(figsize=(0.45 * len(names) + 3, 0.45 * len(names) + 2))
    shown = ax.imshow(grid, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title(f"Pairs of taps, {head}: test accuracy", fontsize=10)
    fig.colorbar(shown, ax=ax, shrink=0.8)
    return png(fig)


def fewshot_curve(fewshot, table) -> bytes:
    """Mean test accuracy against shots per class, with 95% intervals, for the best combination of each head."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    for head, rows in fewshot.groupby("head", sort=False):
        ranked = table[table["head"] == head]
        best = ranked.iloc[0]["taps"] if len(ranked) else rows.iloc[0]["taps"]
        rows = rows[rows["taps"] == best].sort_values("shots")
        ax.errorbar(rows["shots"], rows["test_acc"], yerr=rows["test_acc_ci"], marker="o", capsize=3,
                    label=f"{head} · {best}")
    ax.set_xscale("log")
    ax.set_xlabel("training images per class")
    ax.set_ylabel("test accuracy")
    ax.set_title("Few-shot", fontsize=10)
    ax.legend(fontsize=7)
    return png(fig)
