"""The report's ranking sections: one per ``featcache rank`` folder (runs/ranks/NAME).

Inside reporting (page -> **ranks** -> figures): the ranking by the first score, each score's Kendall tau
against the probe on this data, each score against the probe's validation accuracy, and validation accuracy
against images/s with its Pareto front. Validation, never test: a reader chooses a model from these.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.reporting.figures import _plt, png


def rank_folders(runs_dir: Path) -> list[Path]:
    return sorted(p.parent for p in Path(runs_dir).glob("ranks/*/table.csv"))


def rank_section(folder: Path) -> dict:
    """Tables (lists of dicts) and figures (PNG bytes) of one ranking."""
    import pandas as pd

    table = pd.read_csv(folder / "table.csv", keep_default_na=False, na_values=[""])
    ok, failed = table[table["status"] == "ok"], table[table["status"] != "ok"]
    scores = [c for c in table.columns if c not in ("model", "tap", "status", "reason", "width", "params",
                                                     "images_per_s")]
    about = _about(folder)
    out = {"name": folder.name, "scores": scores, "n_models": int(table["model"].nunique()),
           "title": f"{', '.join(map(str, about.get('patterns') or [])) or 'models'} on "
                    f"{about.get('dataset') or folder.name.rsplit('-', 1)[0]}",
           "random": about.get("weights") == "random",
           "n_taps": len(ok), "top": ok.head(15).to_dict("records"), "failed": failed.to_dict("records")}
    if (folder / "tau.csv").exists() and (folder / "confirm.csv").exists():
        confirm = pd.read_csv(folder / "confirm.csv").merge(ok[["model", "tap", "images_per_s"]], on=["model", "tap"])
        out["taus"] = pd.read_csv(folder / "tau.csv").to_dict("records")
        out["agreement"] = agreement(confirm, scores)
        out["pareto"] = pareto(confirm)
    return out


def _about(folder: Path) -> dict:
    """The ranking's rank.json (patterns, dataset, weights), or {} where an older ranking has none."""
    import json

    from featcache.data.safe import read_regular

    try:
        about = json.loads(read_regular(folder / "rank.json", "rank.json", 1 << 20))
    except (OSError, ValueError):
        return {}
    return about if isinstance(about, dict) else {}


def agreement(confirm, scores: list[str]) -> bytes:
    """Each score (x) against the logreg probe's validation accuracy (y), one panel per score."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(scores), figsize=(3.4 * len(scores), 3.0), squeeze=False)
    for ax, score in zip(axes[0], scores):
        ax.scatter(confirm[score], confirm["logreg_val_acc"], s=18)
        ax.set_xlabel(score)
        ax.set_ylabel("logreg validation accuracy")
    fig.suptitle("Does the score order taps as the probe does? (the taps --confirm checked)", fontsize=10)
    return png(fig)


def front(rate: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both images/s and accuracy, by images/s."""
    order = np.lexsort((-accuracy, -rate))  # fastest first; at equal speed the more accurate first
    keep, best = [], -np.inf
    for i in order:
        if accuracy[i] > best:
            keep.append(i)
            best = accuracy[i]
    return np.asarray(keep, dtype=int)


def pareto(confirm) -> bytes | None:
    """Validation accuracy against images/s of every confirmed tap; the Pareto front joined."""
    rows = confirm.dropna(subset=["images_per_s"])
    if rows.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    rate, accuracy = rows["images_per_s"].to_numpy(float), rows["logreg_val_acc"].to_numpy(float)
    ax.scatter(rate, accuracy, s=18, color="0.6")
    best = front(rate, accuracy)
    ax.plot(rate[best], accuracy[best], "o-", color="C3", label="Pareto front")
    for i in best:
        ax.annotate(f"{rows['model'].iloc[i]}:{rows['tap'].iloc[i]}", (rate[i], accuracy[i]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("images/s of the model's network on this device")
    ax.set_ylabel("logreg validation accuracy")
    ax.legend(fontsize=7)
    ax.set_title("Which model is best for its cost", fontsize=10)
    return png(fig)
