"""The pipeline ledger: which run folders an identical training stage already wrote.

Inside the pipeline package (files -> **ledger**). A training stage is keyed by a hash of its
request (less the fields that only change how it is shown or resumed) and its inputs' cache
identities; ``<runs-dir>/pipeline-ledger.json`` maps the key to the run folders, and the stage
is reused while they are all still there.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from featcache.extraction.config import cache_identities
from featcache.files import atomic_write
from featcache.requests import request_hash

# fields that do not change a stage's result (--skip-bad-images: the cache either holds the rows or was not written)
UI_ONLY = ("quiet", "resume", "trust_pickles", "force", "skip_bad_images")
LEDGER = "pipeline-ledger.json"


def stage_key(kind: str, request) -> str:
    """What a training stage's result depends on: every field of its request, and its inputs' fingerprints.

    The fingerprints (dataset files, weights, preprocessing) make a changed photo folder or
    weights file a new stage even when the options read the same.
    """
    inputs = {name: cache.hash for name, cache in cache_identities(request.config().features).items()}
    settled = {k: v for k, v in dataclasses.asdict(request).items() if k not in UI_ONLY}
    return request_hash([kind, settled, inputs])


def _ledger(runs_dir: Path) -> dict:
    try:
        return json.loads((runs_dir / LEDGER).read_text())
    except (OSError, ValueError):
        return {}


def remember(runs_dir: Path, key: str, entry: dict) -> None:
    ledger = _ledger(runs_dir)
    ledger[key] = entry
    atomic_write(runs_dir / LEDGER, json.dumps(ledger, indent=2, sort_keys=True))


def recorded(runs_dir: Path, key: str) -> list[str] | None:
    entry = _ledger(runs_dir).get(key)
    if entry and all((runs_dir / name / "record.json").is_file() for name in entry["runs"]):
        return entry["runs"]
    return None
