"""The one rule that turns a dataset's raw label values into classes, for every source that reads labels
(manifest, shards, Hugging Face).

Stage 1 (data), below the sources: missing values in any spelling are refused with their count, numeric labels
compare as numbers (``1`` and ``01`` are one class), the classes are the labels present (a gap in integer labels
is said), and lists, numbers beside text in typed data and absurd class counts are refused.
"""

from __future__ import annotations

import math
import re

import numpy as np

from featcache.errors import FeatcacheError

MAX_CLASSES = 100_000  # ImageNet-21k has 21,841
MISSING = {"", "na", "n/a", "nan", "null", "none", "<na>", "nat", "?"}  # spellings of a missing label
INTEGER = re.compile(r"^[+-]?\d+$")


def is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and value.strip().lower() in MISSING:
        return True
    try:
        import pandas as pd

        return value is pd.NA or value is pd.NaT
    except ImportError:
        return False


def _kind(value) -> tuple[str, object]:
    """("int", the integer) or ("text", the stripped text); lists, dicts and non-integer floats are refused by
    the caller."""
    if isinstance(value, (bool, np.bool_)):
        return "text", str(value)
    if isinstance(value, (int, np.integer)):
        return "int", int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():  # Parquet: ints beside a NaN
        return "int", int(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        text = value.strip()
        return ("int", int(text)) if INTEGER.match(text) and len(text) < 19 else ("text", text)
    return "other", value


def _text(value) -> str:
    return (value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)).strip()


def label_classes(values: dict[str, list], where: str, names: list[str] | None = None, row=None
                  ) -> tuple[tuple[str, ...], dict[str, np.ndarray], list[str]]:
    """Classes and per-split class numbers from the raw label values of each split.

    Args:
        values: split -> its rows' raw labels (text, integers, floats from Parquet, None ...).
        where: the dataset, as errors name it.
        names: class names that integer labels index (a ClassLabel's), or None.
        row: (split, position) -> how errors name a row [default: "row K of the S split"].

    Returns:
        (class names, split -> int64 class numbers, notes to say). The classes are the labels present, in
        numeric order where every label is an integer (``1`` and ``01`` one class), else in text order as
        written (text labels of which only some read as numbers stay text); a label missing in any spelling,
        a list or mapping, numbers beside text in typed data (Parquet, JSON), an integer outside ``names``, or
        more than :data:`MAX_CLASSES` classes is one :class:`FeatcacheError`.
    """
    row = row or (lambda split, k: f"row {k} of the {split} split")
    parsed: dict[str, list] = {}
    kinds: dict[str, dict] = {}  # "int" / "text" -> split -> its first such label
    typed = False  # whether any label came as a number (Parquet, Arrow, JSON) rather than as text
    missing = []
    for split, raw in values.items():
        out = []
        for k, value in enumerate(raw):
            if is_missing(value):
                missing.append((split, k))
                out.append(None)
                continue
            kind, v = _kind(value)
            if kind == "other":
                shown = type(value).__name__ if isinstance(value, (list, dict, tuple)) else repr(value)[:40]
                raise FeatcacheError(f"{row(split, k)} of {where} has label {shown}: a label is one class name "
                                     f"or integer")
            kinds.setdefault(kind, {}).setdefault(split, v)
            typed = typed or not isinstance(value, (str, bytes))
            out.append(v)
        parsed[split] = out
    if missing:
        raise FeatcacheError(f"{len(missing)} row(s) of {where} have no label (empty, NA, NaN, null ...; first: "
                             f"{row(*missing[0])}): every image needs a label; remove those rows or fill them in")
    if len(kinds) > 1 and typed:
        (int_split, number), (text_split, text) = next(iter(kinds["int"].items())), next(iter(kinds["text"].items()))
        raise FeatcacheError(f"{where} mixes integer labels ({number} in {int_split}) with text labels "
                             f"({text[:40]!r} in {text_split}): give every row a label of one kind")
    if len(kinds) > 1:  # text that is sometimes a number ("3", "4", "5+"): the class names as written
        kinds = {"text": kinds["text"]}
        parsed = {split: [None if raw is None else _text(raw) for raw in values[split]] for split in parsed}
    numeric = "int" in kinds
    distinct = sorted({v for out in parsed.values() for v in out})
    if len(distinct) > MAX_CLASSES:
        raise FeatcacheError(f"{where} has {len(distinct):,} distinct labels, more than featcache's "
                             f"{MAX_CLASSES:,} classes: check the label column")
    notes = []
    if names is not None:
        if not numeric:
            number = {n: k for k, n in enumerate(names)}
            unknown = [v for v in distinct if v not in number]
            if unknown:
                raise FeatcacheError(f"{where} has label(s) {', '.join(map(repr, unknown[:3]))} outside its "
                                     f"{len(names)} class names")
            distinct = [number[v] for v in distinct]
            parsed = {s: [number[v] for v in out] for s, out in parsed.items()}
        outside = [v for v in distinct if not 0 <= v < len(names)]
        if outside:
            raise FeatcacheError(f"{where} has label {outside[-1] if outside[-1] >= 0 else outside[0]}, outside its "
                                 f"{len(names)} classes (0 to {len(names) - 1}): the labels and the class list "
                                 f"disagree")
        shown = [names[v] for v in distinct]
        if len(distinct) < len(names):
            notes.append(f"{len(names) - len(distinct)} of the {len(names)} named classes of {where} have no "
                         f"image and are left out ({_list([names[k] for k in range(len(names)) if k not in set(distinct)])})")
    else:
        shown = [str(v) for v in distinct]
        missing_between = distinct[-1] - distinct[0] + 1 - len(distinct) if numeric and distinct else 0
        if missing_between > MAX_CLASSES:
            raise FeatcacheError(f"{where}'s integer labels run from {distinct[0]:,} to {distinct[-1]:,} with "
                                 f"{len(distinct)} present: class numbers that far apart are beyond featcache's "
                                 f"{MAX_CLASSES:,} classes; check the labels")
        if missing_between:  # counted, and the first few named, without a list as long as the largest label
            gaps = (g for a, b in zip(distinct, distinct[1:]) for g in range(a + 1, min(b, a + 8)))
            first = [str(g) for _, g in zip(range(6), gaps)]
            notes.append(f"{where}'s classes are the {len(distinct)} integer labels present ({_list(shown)}); "
                         f"{missing_between:,} integer(s) between them have no image ({', '.join(first)}"
                         f"{' ...' if missing_between > len(first) else ''})")
    number = {v: k for k, v in enumerate(distinct)}
    labels = {s: np.asarray([number[v] for v in out], dtype=np.int64) for s, out in parsed.items()}
    return tuple(shown), labels, notes


def _list(items, most: int = 6) -> str:
    items = list(items)
    return ", ".join(items[:most]) + (f" ... ({len(items)} in all)" if len(items) > most else "")
