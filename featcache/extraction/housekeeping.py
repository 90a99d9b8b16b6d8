"""``featcache cache list|prune``: the cache files of a folder, what uses them, and removing the ones asked for.

Flow: cli (browse) -> **housekeeping** (reads store's layout). A cache is ``<backbone>-<hash12>.h5`` with its
``.timing.json``, or an unfinished ``<backbone>-<hash12>.h5.partial``; nothing else in the folder is listed or
touched, and a file with such a name is removed only where featcache provably wrote it (its stored fingerprint
hashes to the name's hash); prune refuses a filesystem root and the home folder as --cache-dir. Its users are the run folders (``record.json``: ``caches``), sweep folders (``sweep.json``: ``caches``)
and rankings (``ranks/*/rows.jsonl``: each model's ``cache``) under the runs folders given, matched by file name
(the fingerprint's hash), so runs copied elsewhere still count. A cache whose lock another featcache process holds
(being written) is never removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from featcache.errors import FeatcacheError
from featcache.extraction.store import timing_file

NAME = re.compile(r"^(?P<backbone>.+)-(?P<hash>[0-9a-f]{12})\.h5(?P<partial>\.partial)?$")
UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
AGES = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class CacheFile:
    path: Path
    dataset: str  # the folder below the cache folder (digits, folder-photos ...)
    backbone: str
    hash: str
    state: str  # complete | partial | foreign (not provably featcache's: never removed)
    size: int  # bytes, its timing file included
    modified: float  # seconds since the epoch
    users: list[str] = field(default_factory=list)  # run and sweep folders that read it

    def as_dict(self) -> dict:
        return {"path": str(self.path), "dataset": self.dataset, "backbone": self.backbone, "hash": self.hash,
                "state": self.state, "bytes": self.size, "modified": self.modified, "users": self.users}


def list_caches(cache_dir: Path, runs_dirs: list[Path]) -> list[CacheFile]:
    """Every cache file under ``cache_dir``, oldest first, with its users in ``runs_dirs``."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise FeatcacheError(f"no cache folder {cache_dir}: give the --cache-dir that featcache extract wrote to")
    users = users_of(runs_dirs)
    found = []
    for path in sorted(cache_dir.rglob("*.h5*")):
        match = NAME.match(path.name)
        if not match or not path.is_file() or path.is_symlink():
            continue
        stat = path.stat()
        timing = timing_file(path)
        size = stat.st_size + (timing.stat().st_size if timing.is_file() else 0)
        final = path.name.removesuffix(".partial")
        found.append(CacheFile(path, str(path.parent.relative_to(cache_dir)), match["backbone"], match["hash"],
                               _state(path, match["hash"], bool(match["partial"])), size, stat.st_mtime,
                               sorted(users.get(final, []))))
    return sorted(found, key=lambda c: c.modified)


def _state(path: Path, name_hash: str, partial: bool) -> str:
    """complete or partial where featcache provably wrote the file: an HDF5 file of featcache's format whose
    stored fingerprint hashes to the hash in its name; else foreign (damaged, or another program's file that
    only looks like a cache by its name), which prune never removes."""
    import h5py

    from featcache.extraction.store import FORMAT, fingerprint_hash

    try:
        with h5py.File(path, "r") as f:
            fingerprint = f.attrs.get("fingerprint")
            if isinstance(fingerprint, bytes):
                fingerprint = fingerprint.decode("utf-8", "replace")
            ours = isinstance(fingerprint, str) and f.attrs.get("format") == FORMAT and \
                fingerprint_hash(json.loads(fingerprint))[:12] == name_hash  # the rule that named it
            if not ours:
                return "foreign"
            return "partial" if partial else ("complete" if f.attrs.get("complete") else "foreign")
    except (OSError, ValueError, TypeError, RecursionError):
        return "foreign"


def users_of(runs_dirs: list[Path]) -> dict[str, list[str]]:
    """cache file name -> the run and sweep folders under ``runs_dirs`` that read it (unreadable records skipped:
    a damaged run is no user)."""
    users: dict[str, list[str]] = {}
    for runs_dir in runs_dirs:
        runs_dir = Path(runs_dir)
        if not runs_dir.is_dir():
            continue
        for name in ("record.json", "sweep.json"):
            for file in runs_dir.rglob(name):
                for cache in _caches_named(file):
                    users.setdefault(cache, []).append(str(file.parent))
        for file in runs_dir.rglob("ranks/*/rows.jsonl"):  # a ranking's models, one line each with its cache
            for cache in _ranked(file):
                users.setdefault(cache, []).append(str(file.parent))
    return users


def _ranked(file: Path) -> set[str]:
    try:
        lines = file.read_text(errors="replace").splitlines()
    except OSError:
        return set()
    named = set()
    for line in lines:
        try:
            cache = json.loads(line).get("cache")
        except (ValueError, AttributeError):
            continue
        if isinstance(cache, str):
            named.add(Path(cache).name)
    return named


def _caches_named(file: Path) -> list[str]:
    try:
        caches = json.loads(file.read_text()).get("caches")
    except (OSError, ValueError, AttributeError):
        return []
    if isinstance(caches, dict):  # a run: backbone -> {"path", "fingerprint"}
        caches = [c.get("path") for c in caches.values() if isinstance(c, dict)]
    return [Path(c).name for c in caches or [] if isinstance(c, str)]


def parse_size(text: str, flag: str = "--larger-than") -> int:
    """``500M``, ``2G``, ``1.5g``, ``100000`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise FeatcacheError(f"{flag} takes a size such as 500M or 2G. Got {text!r} instead.")
    return int(float(match[1]) * UNITS[match[2]])


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``2w``, ``90m`` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*", text.lower())
    if not match:
        raise FeatcacheError(f"--older-than takes an age such as 30d, 12h or 2w. Got {text!r} instead.")
    return float(match[1]) * AGES[match[2]]


def prunable_folder(cache_dir: Path) -> Path:
    """``--cache-dir`` for prune: never a filesystem root or the home folder (a cache folder is one featcache
    made for its caches)."""
    resolved = Path(cache_dir).resolve()
    what = "the filesystem root" if resolved == Path(resolved.anchor) else \
        "the home folder" if resolved == Path.home().resolve() else None
    if what:
        raise FeatcacheError(f"--cache-dir {cache_dir} is {what}: featcache cache prune works on a cache folder "
                             f"(such as ./cache); name it")
    return Path(cache_dir)


def chosen(caches: list[CacheFile], older_than: float | None = None, larger_than: int | None = None,
           unused: bool = False, now: float | None = None) -> list[CacheFile]:
    """The caches that meet every criterion given (at least one must be); never a foreign file."""
    if older_than is None and larger_than is None and not unused:
        raise FeatcacheError("featcache cache prune needs at least one of --older-than, --larger-than, --unused "
                             "(add --dry-run to see what it would remove)")
    now = time.time() if now is None else now
    return [c for c in caches if c.state != "foreign" and (older_than is None or now - c.modified > older_than)
            and (larger_than is None or c.size > larger_than) and (not unused or not c.users)]


def remove(cache: CacheFile) -> bool:
    """Remove the cache file and its timing file; False (nothing removed) where another process holds its lock
    or the file is not provably featcache's."""
    if cache.state == "foreign":
        return False
    final = cache.path.with_name(cache.path.name.removesuffix(".partial"))
    lock_path = final.with_name(final.name + ".lock")
    with contextlib.ExitStack() as stack:
        if lock_path.exists():
            handle = stack.enter_context(open(lock_path, "a"))
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
        cache.path.unlink(missing_ok=True)
        if not cache.path.name.endswith(".partial"):
            timing_file(cache.path).unlink(missing_ok=True)
    return True


def human_size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def human_age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{seconds:.0f}s"
