"""The report's choice sections: one per ``featcache choose`` folder (runs/choices/NAME), first on the page.

Inside reporting (page -> **choices** -> figures): the recommendation box (the sentence a supervisor reads),
the funnel (how many candidates each round kept, and why), P(best) as bars, accuracy against images/s with the
recommended and fast choices marked, and the trust table. Every number is from the training split (out of
fold) but the recommendation's one test figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.reporting.figures import _plt, png


def choice_folders(runs_dir: Path) -> list[Path]:
    return sorted(p.parent for p in Path(runs_dir).glob("choices/*/answer.json"))


def is_choice(folder: Path) -> bool:
    return (folder / "answer.json").is_file() and folder.parent.name == "choices"


def choice_section(folder: Path) -> dict:
    from featcache.choosing.answer import Choice

    choice = Choice.load(folder)
    a = choice.answer
    finalists = choice.table
    trust = choice.trust.replace({np.nan: None}).to_dict("records")
    return {"name": folder.name, "sentence": choice.sentence(), "lines": choice.lines(), "answer": a,
            "funnel": choice.funnel.to_dict("records"), "trust": trust,
            "finalists": finalists.replace({np.nan: None}).to_dict("records"),
            "bars": p_best_bars(finalists), "pareto": accuracy_speed(finalists)}


def _labels(finalists) -> list[str]:
    return [f"{c} · {h}" for c, h in zip(finalists["candidate"], finalists["head"])]


def p_best_bars(finalists) -> bytes:
    """P(best) of each finalist, the recommendation and the fast choice coloured."""
    plt = _plt()
    order = np.argsort(-finalists["p_best"].to_numpy(float), kind="stable")
    rows = finalists.iloc[order]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.0))
    colours = ["C3" if r else ("C2" if f else "0.6") for r, f in zip(rows["recommended"], rows["fast"])]
    ax.barh(range(len(rows)), rows["p_best"], color=colours)
    ax.set_yticks(range(len(rows)), _labels(rows), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("P(best): share of bootstrap resamples no other finalist beats it")
    ax.set_title("Red: recommended; green: the fast choice", fontsize=9)
    return png(fig)


def accuracy_speed(finalists) -> bytes | None:
    """Out-of-fold accuracy against images/s of every finalist, its Pareto front joined (no other finalist is both
    faster and more accurate); the recommended and fast choices marked."""
    rows = finalists.dropna(subset=["images_per_s"])
    if rows.empty:
        return None
    from matplotlib.ticker import FuncFormatter

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    from featcache.reporting.ranks import front

    ax.scatter(rows["images_per_s"], rows["accuracy"], s=18, color="0.6", label="finalists")
    rate = rows["images_per_s"].to_numpy(float)
    best = front(rate, rows["accuracy"].to_numpy(float))
    ax.plot(rate[best], rows["accuracy"].to_numpy(float)[best], "-", color="0.4", lw=1, label="Pareto front")
    middle = np.sqrt(rate.min() * rate.max())
    for mask, colour, name in ((rows["recommended"] == True, "C3", "recommended"),  # noqa: E712
                               (rows["fast"] == True, "C2", "fast choice")):  # noqa: E712
        picked = rows[mask]
        ax.scatter(picked["images_per_s"], picked["accuracy"], s=60, color=colour, label=name, zorder=3)
        for _, r in picked.iterrows():
            right = r["images_per_s"] > middle  # the label towards the middle, inside the axes
            ax.annotate(f"{r['candidate']} · {r['head']}", (r["images_per_s"], r["accuracy"]), fontsize=7,
                        xytext=(-4 if right else 4, 4), textcoords="offset points", ha="right" if right else "left")
    if rate.max() > 10 * rate.min():
        ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.margins(x=0.08)
    ax.set_xlabel("images/s of the backbones on this device")
    ax.set_ylabel("accuracy, out of fold")
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.legend(fontsize=7)
    return png(fig)
