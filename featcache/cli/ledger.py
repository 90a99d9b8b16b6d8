"""The pipeline ledger: which run folders an identical training stage already wrote.

Inside the command line (pipeline -> **ledger**). A training stage is keyed by a hash of all
its resolved options (less those that only change how it is shown or resumed) and its
inputs' fingerprints; ``<runs-dir>/pipeline-ledger.json`` maps the key to the run folders,
and the stage is reused while they are all still there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from featcache.backbones.registry import BACKBONES
from featcache.backbones.taps import resolve_device, resolve_precision
from featcache.data.datasets import dataset_identity
from featcache.extraction.config import fingerprint
from featcache.extraction.store import fingerprint_hash
from featcache.files import atomic_write

if TYPE_CHECKING:
    from featcache.cli.pipeline import Stage

# options that do not change a stage's result (--skip-bad-images: the cache either holds the rows or was not written)
UI_ONLY = ("quiet", "resume", "trust_pickles", "force", "skip_bad_images")
LEDGER = "pipeline-ledger.json"


def stage_key(stage: Stage) -> str:
    """What a training stage's result depends on: every resolved option, and the inputs' fingerprints.

    The fingerprints (dataset files, weights, preprocessing) make a changed photo folder or
    weights file a new stage even when the options read the same.
    """
    features = stage.config.features
    precision = resolve_precision(features.precision, resolve_device(features.device))
    identity = dataset_identity(features.data)
    inputs = {name: fingerprint_hash(fingerprint(features, BACKBONES.lookup(name), precision, identity))
              for name in features.backbones}
    settled = {k: str(v) if isinstance(v, Path) else v for k, v in stage.params.items() if k not in UI_ONLY}
    text = json.dumps([stage.kind, settled, inputs], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
