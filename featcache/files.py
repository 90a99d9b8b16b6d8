"""The one atomic write, and the one lock: a file is either its old self or complete, and one writer at a time
(and the one hash of a file's bytes).

Below every stage: reports, timing records, the pipeline ledger and fine-tune checkpoints
are written through :func:`atomic_write`. (A cache file and a run folder are built under a
temporary name of their own and renamed the same way, because they grow over time.) A cache,
a sweep folder and a run request have one writer at a time through :func:`lock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from featcache.errors import FeatcacheError


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read 1 MiB at a time (a weights file: never loaded to be identified)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, content: str | bytes | Callable[[Path], None]) -> Path:
    """Write ``content`` (text, bytes, or a function that writes a given path) to ``path`` atomically.

    The data goes to a hidden sibling first and is renamed into place; on any error the
    sibling is removed and the OSError propagates for the caller to word.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def lock(lock_path: Path, on_wait: Callable[[], None] | None = None, what: str = "folder",
         fix: str = "choose another folder"):
    """Hold an exclusive lock on ``lock_path`` (created if missing, and left in place: a lock file is
    never a result); a second holder calls ``on_wait`` once, then waits. The lock goes with the process,
    also when it is killed."""
    lock_path = Path(lock_path)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a")
    except OSError as exc:
        raise FeatcacheError(f"cannot write in {what} {lock_path.parent}: {exc.strerror}; {fix}") from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
