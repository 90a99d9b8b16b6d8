"""Reading what other people's datasets hold without trusting it: bounded file reads, a pickle loader that
cannot run code, and the one rule that turns raw label values into classes.

Stage 1 (data), below every source (``datasets``, ``manifest``, ``shards``, ``hub``, ``torchvision_sets``) and
``images``. Data is data: a dataset folder, a manifest or a shard that someone shares may name ``/dev/zero`` or
a FIFO as an image, hold a crafted pickle, or carry labels that are not what the user meant. Here:

- :func:`read_regular` opens only regular files (a device, FIFO or socket is refused before anything blocks)
  and reads at most :data:`MAX_FILE_BYTES`;
- :func:`restricted_load` unpickles only the containers and arrays a dataset's pickles hold (CIFAR's
  batches): any other global, which is how a pickle runs code, is refused;
- :func:`label_classes` makes classes of the labels present: missing values are refused with their count,
  numeric labels compare as numbers (``1`` and ``01`` are one class), a gap in integer labels is said,
  labels of mixed kinds, lists and absurd class counts are refused.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import stat

import numpy as np

from featcache.errors import FeatcacheError

MAX_FILE_BYTES = 1 << 30  # one image file; far above any real photo (a 100-megapixel 16-bit TIFF is 600 MB)
MAX_LABEL_BYTES = 1 << 16  # a label member of a shard (.cls, .json)
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841
MISSING = {"", "na", "n/a", "nan", "null", "none", "<na>", "nat", "?"}  # spellings of a missing label


class UnsafeFile(FeatcacheError):
    """A file featcache refuses to read: not a regular file, too large, or a pickle that would run code."""


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def regular_size(path, what: str = "file", limit: int = MAX_FILE_BYTES) -> int:
    """The size of ``path`` if it is a regular file within ``limit`` (symbolic links followed); else
    :class:`UnsafeFile` in one line. Nothing is opened, so a FIFO cannot block here."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:  # a name too long, a loop of links, no permission
        raise UnsafeFile(f"cannot read {what} {_short(path)}: {exc.strerror or exc}") from None
    _check(info, path, what, limit)
    return info.st_size


def _check(info, path, what: str, limit: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device" if stat.S_ISCHR(info.st_mode)
                or stat.S_ISBLK(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else
                "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file")
        raise UnsafeFile(f"cannot read {what} {_short(path)}: it is {kind}, not a regular file")
    if info.st_size > limit:
        raise UnsafeFile(f"cannot read {what} {_short(path)}: {human_bytes(info.st_size)} is over featcache's limit "
                         f"of {human_bytes(limit)} for one {what}")


def read_regular(path, what: str = "file", limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. The file is opened without blocking (a FIFO
    that appeared after a check still cannot hang the read), checked on its own descriptor, and read no
    further than ``limit`` (a file that grows while read is refused)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UnsafeFile(f"cannot read {what} {_short(path)}: {exc.strerror or exc}") from None
    try:
        _check(os.fstat(fd), path, what, limit)
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 24, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise UnsafeFile(f"cannot read {what} {_short(path)}: it grew past featcache's limit of "
                                 f"{human_bytes(limit)} while read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _short(path) -> str:
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
    return text if len(text) <= 160 else text[:80] + "..." + text[-60:]


# --- pickles --------------------------------------------------------------------------------


class Forbidden(pickle.UnpicklingError):
    """What a pickle asked for that a dataset's pickle never needs: a function, a class, a codec."""


def _encode(text, encoding="latin1", errors="strict"):
    """``_codecs.encode`` as protocol-2 pickles of bytes use it (latin-1 only: no other codec is reached)."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise Forbidden(f"the pickle asks for the {encoding!r} codec")
    return text.encode("latin1", errors)


def _dtype(*args, **kwargs):
    made = np.dtype(*args, **kwargs)
    if made.hasobject:
        raise Forbidden("the pickle holds an array of Python objects")
    return made


def _numpy_global(name: str):
    from numpy.lib import format as _  # noqa: F401  (numpy's own modules are imported already)

    for module in ("numpy._core.multiarray", "numpy.core.multiarray", "numpy._core.numeric", "numpy.core.numeric"):
        try:
            return getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {name}")


ARRAY_GLOBALS = {
    # how numpy pickles an ndarray (protocol 2: _reconstruct + setstate; protocol 5: _frombuffer)
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ARRAY_GLOBALS:
            raise Forbidden(f"the pickle asks for {module}.{name}")
        if (module, name) == ("_codecs", "encode"):
            return _encode
        if (module, name) == ("numpy", "dtype"):
            return _dtype
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        return _numpy_global(name)

    def persistent_load(self, pid):
        raise Forbidden("the pickle refers to outside objects")


def restricted_load(file, encoding: str = "latin1", where: str = "file"):
    """``pickle.load`` that admits only containers, numbers, text, bytes and numpy arrays of plain dtypes:
    the pickled batches of CIFAR-10/100 load; a pickle that would call anything else (and so run code) is
    :class:`UnsafeFile` in one line naming ``where``. A truncated or damaged pickle raises as ``pickle.load``
    does (the caller says the files are not the dataset's)."""
    try:
        return _Restricted(file, encoding=encoding).load()
    except Forbidden as exc:
        raise UnsafeFile(f"{where} is not a plain pickle of arrays and lists ({exc}): featcache does not run "
                         f"code from data; replace the file with the dataset's published one") from None


# --- labels ---------------------------------------------------------------------------------

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
