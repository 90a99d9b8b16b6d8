"""Reading what other people's datasets hold without trusting it: bounded file reads and a pickle loader that
cannot run code.

Stage 1 (data), below every source (``datasets``, ``manifest``, ``shards``, ``hub``, ``torchvision_sets``) and
``images``. Data is data: a dataset folder, a manifest or a shard that someone shares may name ``/dev/zero`` or
a FIFO as an image, hold a crafted pickle, or carry labels that are not what the user meant. Here:

- :func:`read_regular` opens only regular files (a device, FIFO or socket is refused before anything blocks)
  and reads at most :data:`MAX_FILE_BYTES`;
- :func:`restricted_load` unpickles only the containers and arrays a dataset's pickles hold (CIFAR's
  batches): any other global, which is how a pickle runs code, is refused;
- the one rule from raw labels to classes is :mod:`featcache.data.labels`'s.
"""

from __future__ import annotations

import os
import pickle
import stat

import numpy as np

from featcache.errors import FeatcacheError

MAX_FILE_BYTES = 1 << 30  # one image file; far above any real photo (a 100-megapixel 16-bit TIFF is 600 MB)
MAX_LABEL_BYTES = 1 << 16  # a label member of a shard (.cls, .json)


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


def read_own(path, what: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a file featcache writes and appends to in its own folders (a sweep's or a ranking's rows): a
    link there is refused in one line (appending through it would write outside the folder), anything else as
    :func:`read_regular`."""
    if os.path.islink(path):
        raise UnsafeFile(f"cannot use {what} {_short(path)}: it is a link, which featcache never writes there; "
                         f"remove it")
    return read_regular(path, what, limit)


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


def regular_csv(path, what: str, limit: int, **options):
    """A CSV table from a regular file of at most ``limit`` bytes (:func:`read_regular`): a shared folder's
    FIFO or endless file cannot hang or exhaust the reader."""
    import io

    import pandas as pd

    return pd.read_csv(io.BytesIO(read_regular(path, what, limit)), **options)
