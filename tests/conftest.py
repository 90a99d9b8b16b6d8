"""Shared fixtures: the tiny backbone, generated datasets, CLI runner."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):  # several workers share the cores: each takes its share of threads,
    # and so do the processes its tests start (oversubscribed OpenMP threads spin against each other)
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS
    _share = str(max(1, _cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _share
import tiny  # noqa: E402,F401  registers the "tiny" backbone

from featcache.data.datasets import DataRequest  # noqa: E402
from featcache.data.preprocess import PreprocessConfig
from featcache.extraction.config import ExtractConfig  # noqa: E402

TESTS_DIR = Path(__file__).parent


def tiny_config(tmp_path, **overrides) -> ExtractConfig:
    """A fast extraction: tiny backbone, random weights, 32 px digits on the CPU."""
    data = overrides.pop("data", DataRequest(name="digits", limit_train=120, limit_test=40))
    pre = overrides.pop("preprocess", PreprocessConfig(image_size=32))
    settings = dict(
        data=data, backbones=("tiny",), weights="random", preprocess=pre, device="cpu",
        batch_size=16, num_workers=0, cache_dir=tmp_path / "cache",
    )
    settings.update(overrides)
    return ExtractConfig(**settings)


def write_image_folder(root: Path, classes=("cat", "dog"), per_class=6, size=(40, 30), seed=0) -> Path:
    """Generated photos: one sub-folder per class, each class a different mean colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.full((size[1], size[0], 3), 60 + 120 * k, dtype=np.int16)
            pixels = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path / "photos")


@pytest.fixture(scope="session")
def report_runs(tmp_path_factory):
    """Runs of every kind on the tiny backbone: logreg, mlp, RBF svm (frozen) and a two-phase fine-tune."""
    from featcache.extraction.run import extract
    from featcache.finetuning.config import FinetuneConfig
    from featcache.finetuning.run import finetune
    from featcache.fuse.heads import HeadOptions
    from featcache.fuse.train import FuseTrainConfig, fuse_train

    tmp = tmp_path_factory.mktemp("report")
    data = DataRequest(name="digits", limit_train=200, limit_test=60)
    cfg = tiny_config(tmp, data=data, dtype="float32")
    extract(cfg, progress=False, log=lambda m: None)
    runs = fuse_train(FuseTrainConfig(features=cfg, taps=("late", "early,late"), heads=("logreg", "mlp", "svm"),
                                      runs_dir=tmp / "runs", options=HeadOptions(hidden=(16,), epochs=5)),
                      log=lambda m: None)
    tuned = finetune(FinetuneConfig(features=cfg, taps="late", head="mlp", hidden=(16,), head_epochs=1, epochs=1,
                                    unfreeze="last-block", lr=1e-3, batch_size=32, runs_dir=tmp / "runs",
                                    num_workers=0), log=lambda m: None, progress=False)
    return tmp, runs + [tuned]


HOSTILE = {  # legal names that are live HTML if a page shows them unescaped
    "folder": "p<img src=x onerror=alert(1)>",
    "class": "<b onmouseover=alert(2)>cat",
    "run": "<svg onload=alert(3)>",
}


def hostile_runs(tmp: Path) -> Path:
    """A run on a folder dataset whose folder and class names are HTML, renamed to HTML too (as a shared run could be)."""
    import json

    from featcache.extraction.run import extract
    from featcache.fuse.train import FuseTrainConfig, fuse_train
    from featcache.runs.records import RECORD

    photos = write_image_folder(tmp / HOSTILE["folder"], classes=(HOSTILE["class"], "dog"), per_class=8)
    cfg = tiny_config(tmp, data=DataRequest(name="folder", data_dir=photos), dtype="float32", num_workers=0)
    extract(cfg, progress=False, log=lambda m: None)
    [run] = fuse_train(FuseTrainConfig(features=cfg, taps=("late",), heads=("logreg",), runs_dir=tmp / "runs"),
                       log=lambda m: None)
    record = json.loads((run / RECORD).read_text())
    record["run"] = HOSTILE["run"]
    (run / RECORD).write_text(json.dumps(record))
    run.rename(run.parent / HOSTILE["run"])
    return tmp / "runs"


@pytest.fixture(autouse=True)
def fresh_solutions(monkeypatch):
    """Each test starts with no logistic solutions kept from another test's solves (lanes' starts)."""
    from collections import OrderedDict

    from featcache.solvers import lanes

    monkeypatch.setattr(lanes, "_SOLVED", OrderedDict())
