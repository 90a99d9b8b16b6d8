"""Leakage: test images that also stand in train, said before anything is extracted.

Stage 1 (data), used by ``datasets.load_dataset``: the same file, or identical bytes (in-memory pixels by hash,
files of equal size by hash), counted and said as a warning, so a careless manifest or a folder holding copies
is not absorbed into an optimistic test accuracy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

from featcache.data.safe import read_regular
from featcache.data.source import Split
from featcache.errors import FeatcacheError

CONTENT_CHECK_FILES = 100_000  # above this many files, train and test are compared by path only


def leakage(train: Split, test: Split) -> str | None:
    """A warning when test images also stand in train: the same file, or identical bytes (in-memory pixels,
    files of equal size and content); None when none do. Done before anything is extracted, so a careless
    manifest or a folder holding copies is said, not absorbed into an optimistic test accuracy."""
    if train.images is not None and test.images is not None:
        seen = {hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in train.images}
        same = sum(hashlib.blake2b(row.tobytes(), digest_size=16).digest() in seen for row in test.images)
        how = "identical pixels"
    elif isinstance(train.files, tuple) and isinstance(test.files, tuple) and \
            all(isinstance(f, (str, os.PathLike)) for f in (*train.files[:1], *test.files[:1])):
        same, how = _same_files(train.files, test.files)
    else:
        return None
    if not same:
        return None
    return (f"{same} of the {len(test)} test images also stand in train ({how}): the test accuracy will be "
            f"optimistic; remove the copies from one split")


def _same_files(train: tuple, test: tuple) -> tuple[int, str]:
    paths = {os.path.realpath(f) for f in train}
    same = [os.path.realpath(f) in paths for f in test]
    if len(train) + len(test) > CONTENT_CHECK_FILES:
        return sum(same), "the same files; contents not compared above 100,000 files"
    sizes: dict[int, list[str]] = {}
    for f in train:
        with _passed_over():
            sizes.setdefault(os.stat(f).st_size, []).append(os.fspath(f))
    digests: dict[str, bytes] = {}

    def digest(path: str) -> bytes | None:
        if path not in digests:
            digests[path] = _file_digest(path)
        return digests[path]

    for k, f in enumerate(test):
        if same[k]:
            continue
        with _passed_over():
            candidates = sizes.get(os.stat(f).st_size, [])
            if candidates and (mine := digest(os.fspath(f))) is not None:
                same[k] = any(digest(c) == mine for c in candidates)
    return sum(same), "the same files or identical bytes"


@contextlib.contextmanager
def _passed_over():
    """A file that cannot be read here is named when its image is decoded, not by the leakage check."""
    with contextlib.suppress(OSError, ValueError):
        yield


def _file_digest(path: str) -> bytes | None:
    try:
        return hashlib.blake2b(read_regular(path, "image"), digest_size=16).digest()
    except (OSError, FeatcacheError):
        return None
