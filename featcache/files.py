"""The one atomic write: a file is either its old self or complete, never half-written.

Below every stage: reports, timing records, the pipeline ledger and fine-tune checkpoints
are written through :func:`atomic_write`. (A cache file and a run folder are built under a
temporary name of their own and renamed the same way, because they grow over time.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path


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
