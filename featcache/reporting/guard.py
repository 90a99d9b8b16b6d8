"""What a report may read and replace: the run folders it can show, and the files it may overwrite.

Inside reporting (guard -> page). Run folders come from other people: one whose record cannot be
read is listed as not shown rather than stopping the page; an -o page or CSV that featcache did
not write is never replaced without --force.
"""

from __future__ import annotations

from pathlib import Path

from featcache.errors import FeatcacheError
from featcache.runs.comparison import COLUMNS, comparison_table
from featcache.runs.records import RunRecord, load_record


def check_replaceable(out: Path, force: bool) -> None:
    """The page ``out`` and the CSV beside it may be written: absent, featcache's own, or ``force``."""
    for path in (out, out.with_suffix(".csv")):
        if not force and path.is_file() and not _ours(path):
            raise FeatcacheError(f"{path} exists and featcache did not write it: choose another -o, or pass --force "
                                 f"to replace it")


def readable_runs(folders: list[Path], named: bool, unreadable: list, log) -> tuple[list[Path], list[RunRecord]]:
    """The folders whose record reads and tables, with their records; the others go to ``unreadable`` (a run
    named on the command line is an error instead: the user asked for it)."""
    kept, records = [], []
    for folder in folders:
        try:
            record = load_record(folder)
            comparison_table([record])  # its fields are what the table reads
        except Exception as exc:
            if named:
                raise FeatcacheError(f"run {folder} cannot be reported: {why(exc)}") from None
            unreadable.append({"name": folder.name, "why": why(exc)})
            log(f"report: run {folder} is unreadable ({why(exc)}): shown as such")
            continue
        kept.append(folder)
        records.append(record)
    return kept, records


def why(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if isinstance(exc, FeatcacheError) else f"{type(exc).__name__}: {text[:160]}"


def _ours(path: Path) -> bool:
    """A report page or table featcache wrote: the page names featcache as its generator (or, before that
    tag, in its "generated ... by featcache" line), the table starts with the comparison table's header."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    if path.suffix == ".csv":
        return head.splitlines()[:1] == [",".join(COLUMNS)]
    return '<meta name="generator" content="featcache' in head or (
        head.startswith("<!DOCTYPE html>") and " by featcache " in head)
