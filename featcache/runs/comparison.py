"""Comparing runs: short labels, the comparison table, and the table as text that fits a terminal.

Flow: records -> **comparison** -> reporting and ``featcache runs``. A run's label says what
it is in a few words (``r18 · layer2+layer4 · mlp``); where two runs in one table would
read the same, the settings that tell them apart are added, and the time only when nothing
else does.
"""

from __future__ import annotations

import re
from pathlib import Path

from featcache.errors import unknown
from featcache.runs.records import RunRecord, list_records

COLUMNS = ["run", "label", "dataset", "backbones", "weights", "taps", "fusion", "head", "chosen", "variant",
           "val_acc", "test_acc", "macro_f1", "fit_s", "warnings"]
HEADERS = {"run": "run folder", "label": "run", "val_acc": "val acc", "test_acc": "test acc", "macro_f1": "macro-F1",
           "fit_s": "fit s", "chosen": "chosen", "warnings": "warn"}
# when a table is too wide, these text columns give way first, each down to a width that still reads
SHRINK = (("run", 16), ("chosen", 12), ("taps", 16), ("fusion", 12), ("variant", 10), ("label", 24))
# left out, in this order, when cutting is not enough: what least tells runs apart first
DROP = ("run", "warnings", "fit_s", "macro_f1", "dataset", "weights", "backbones", "fusion", "chosen", "variant",
        "test_acc", "taps", "head", "val_acc")
LEAST = 4  # the first DROP columns, left out before the label (backbones · taps · head) is cut
TERMINAL_COLUMNS = ["label", "chosen", "val_acc", "test_acc", "macro_f1", "fit_s", "warnings", "run"]
ABBREVIATIONS = {"weight_decay": "wd"}
SHORT_NAMES = {"resnet18": "r18", "resnet50": "r50", "mobilenet_v2": "mnv2", "vgg16": "vgg16"}
# settings that may tell two runs with the same label apart, in the order they are tried
DISTINGUISHING = ("cv", "dataset", "weights", "image_size", "pooling", "tap_norm", "val_fraction", "dtype", "precision",
                  "limit_train", "seed")


def short_name(backbone: str) -> str:
    return SHORT_NAMES.get(backbone, backbone)


def _taps_text(record: RunRecord) -> str:
    """The taps by their one canonical name, the cache's (``layer2``, ``features.13``: what the sweep's and rank's
    tables, the report and ``featcache info`` say, whichever name ``--taps`` used): ``layer2+layer4`` when every
    backbone uses the same, else ``r18:layer4+mnv2:features.18``."""
    per_backbone: dict[str, list[str]] = {}
    for ref in record.taps:
        backbone, _, node = ref.rpartition(":")
        per_backbone.setdefault(backbone, []).append(node)
    names = list(per_backbone.values())
    if all(n == names[0] for n in names):
        return "+".join(names[0])
    return "+".join(f"{short_name(b)}:{t}" for b, taps in per_backbone.items() for t in taps)


def base_label(record: RunRecord) -> str:
    """What a run is, in a few words: backbones · taps · head, and ``ft POLICY`` for a fine-tuned one."""
    head = record.head if not record.finetuned else f"{record.head} · ft {record.config['unfreeze']}"
    backbones = "+".join(short_name(b) for b in record.config["backbones"])
    return f"{backbones} · {_taps_text(record)} · {head}"


def labels(records: list[RunRecord]) -> list[str]:
    """Each run's label, unique within ``records`` where the runs differ at all."""
    out = [base_label(r) for r in records]
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(out):
        groups.setdefault(text, []).append(i)
    for members in (m for m in groups.values() if len(m) > 1):
        for key in DISTINGUISHING:
            values = [records[i].config.get(key) for i in members]
            if len(set(map(str, values))) > 1:
                for i, value in zip(members, values):
                    out[i] += f" · {_setting(key, value)}"
        if len({out[i] for i in members}) < len(members):  # the same settings: only the time tells them apart
            for i in members:
                stamp = records[i].run[:15]  # 20261124-155644
                out[i] += f" · {stamp[4:6]}-{stamp[6:8]} {stamp[9:11]}:{stamp[11:13]}:{stamp[13:15]}"
    return out


def _setting(key: str, value) -> str:
    """A distinguishing setting as a label shows it: ``cv 5`` / ``val split``, ``image size 64``."""
    if key == "cv":
        return f"cv {value}" if value else "val split"
    return f"{key.replace('_', ' ')} {value}"


STAMP = re.compile(r" · \d\d-\d\d \d\d:\d\d:\d\d$")  # the time a label ends with when nothing else differs


def dataset_text(record: RunRecord) -> str:
    """``digits``, ``cifar10``, or a photo folder's own name (``footwear``), not ``folder``."""
    c = record.config
    if c["dataset"] == "folder" and c.get("data_dir"):
        return Path(c["data_dir"]).resolve().name or c["dataset"]
    return c["dataset"]


def variant(record: RunRecord) -> str:
    """frozen, or fine-tuned with its unfreeze policy."""
    if record.finetuned:
        return f"fine-tuned ({record.config['unfreeze']})"
    return "frozen"


def chosen_text(record: RunRecord) -> str:
    """The hyper-parameters validation chose for a frozen head, e.g. ``C=0.1``."""
    if record.finetuned:
        return ""
    parts = []
    for key, value in record.selection["params"].items():
        if key == "kernel":
            parts.append(str(value))
        else:
            parts.append(f"{ABBREVIATIONS.get(key, key)}={value:g}" if isinstance(value, (int, float)) else f"{key}={value}")
    return " ".join(parts)


def _fusion_text(record: RunRecord) -> str:
    norm = record.config["tap_norm"]
    if record.config.get("head") == "resblocks":
        norm = "none"  # one refined feature map: the fine-tune applies no normalisation
    return f"concat, {norm} per tap" if len(record.taps) > 1 else f"{norm} (one tap)"


def comparison_table(records: list[RunRecord]):
    """One row per run, like the studies' results tables, with how each variant was built."""
    import pandas as pd

    rows = [{
        "run": r.run, "label": label, "dataset": dataset_text(r), "backbones": "+".join(r.config["backbones"]),
        "weights": r.config["weights"], "taps": "+".join(r.taps),
        "fusion": _fusion_text(r),
        "head": r.head, "chosen": chosen_text(r), "variant": variant(r),
        "val_acc": r.selection["val_accuracy"], "test_acc": r.metrics["accuracy"],
        "macro_f1": r.metrics["macro_f1"], "fit_s": r.timings["fit_seconds"],
        "warnings": len(r.warnings),
    } for r, label in zip(records, labels(records))]
    return pd.DataFrame(rows, columns=COLUMNS)


def runs_table(runs_dir: Path, unreadable: list | None = None):
    """The comparison table of every run in ``runs_dir`` (given ``unreadable``, the runs whose record cannot be
    read are left out and listed there)."""
    return comparison_table(list_records(runs_dir, unreadable))


def pick(table, columns: str | None, sort: str | None):
    """The table with ``columns`` (comma-separated; default: those that fit a terminal) sorted by ``sort``.

    Numbers sort best first (highest accuracy, shortest fit); text sorts A to Z.
    """
    names = [c.strip() for c in columns.split(",")] if columns else list(TERMINAL_COLUMNS)
    for name in names + ([sort] if sort else []):
        if name not in COLUMNS:
            raise unknown("--columns" if name in names else "--sort", name, COLUMNS)
    if sort:
        numeric = table[sort].dtype.kind in "if"
        table = table.sort_values(sort, ascending=not numeric or sort == "fit_s", kind="stable")
    return table[names]


def as_text(table, width: int = 100) -> str:
    """The table as aligned text never wider than ``width``: text columns other than the label are cut in the
    order of ``SHRINK``, each to no narrower than it still reads; then the columns that tell runs apart least
    (the run folder, warnings, seconds, macro-F1) are left out; then the label is cut, losing its time first
    (backbones, taps, head and the settings that differ tell more); then more columns go (``DROP``), the label
    last of all. A label is cut at its start (``…taps · head · variant``): its end tells two runs of one sweep
    apart."""
    cells = {c: [HEADERS.get(c, c)] + [_cell(c, v) for v in table[c]] for c in table.columns}
    widths = {c: max(map(len, v)) for c, v in cells.items()}

    def excess() -> int:
        return sum(widths.values()) + 2 * (len(widths) - 1) - width

    def shrink(columns):
        for column, narrowest in columns:
            if excess() > 0 and column in widths:
                widths[column] = max(min(narrowest, widths[column]), widths[column] - excess())

    def drop(columns):
        for column in columns:
            if excess() > 0 and column in widths and len(widths) > 1:
                del widths[column]

    shrink([(c, n) for c, n in SHRINK if c != "label"])
    drop(DROP[:LEAST])  # the run folder, warnings, seconds, macro-F1 go before the label is cut
    shrink([(c, n) for c, n in SHRINK if c == "label"])
    drop(DROP[LEAST:])
    if excess() > 0:  # one column left, and still too wide: cut it to the width
        only = next(iter(widths))
        widths[only] = max(2, width)
    numeric = {c for c in table.columns if table[c].dtype.kind in "if"}
    lines = []
    for row in zip(*(cells[c] for c in widths)):
        parts = []
        for c, text in zip(widths, row):
            if len(text) > widths[c] and c == "label":
                text = STAMP.sub("", text)  # the time goes first: backbones, taps, head and settings tell more
            if len(text) > widths[c]:
                text = "…" + text[len(text) - widths[c] + 1:] if c == "label" else text[: widths[c] - 1] + "…"
            parts.append(text.rjust(widths[c]) if c in numeric else text.ljust(widths[c]))
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _cell(column: str, value) -> str:
    if column == "fit_s":
        return f"{value:.1f}"
    if column == "warnings":
        return str(value) if value else "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
