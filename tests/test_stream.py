"""fuse-train --out-of-core: torch heads stream row chunks from HDF5 instead of loading the taps."""

import json
import os
import resource
import subprocess
import sys

import numpy as np
import tiny
from click.testing import CliRunner
from conftest import TESTS_DIR, tiny_config

from featcache.backbones.registry import BACKBONES
from featcache.cli.commands import cli
from featcache.data.datasets import DataRequest, dataset_key
from featcache.data.preprocess import PreprocessConfig
from featcache.extraction.config import fingerprint
from featcache.extraction.reader import FeatureCache
from featcache.extraction.store import CacheWriter, cache_file
from featcache.fuse.fusion import TapNormalizer, TapRef
from featcache.fuse.stream import FusedRows, fit_normalizer

FLAGS = ["--backbone", "tinywide", "--weights", "random", "--image-size", "40", "--device", "cpu", "--seed", "7"]


def synthetic_cache(tmp_path, n_train, n_test, classes=10, seed=0):
    """A cache in the real layout (tinywide's fingerprint for FLAGS) holding large synthetic features."""
    dim = tiny.WIDE
    cfg = tiny_config(tmp_path, preprocess=PreprocessConfig(image_size=40), data=DataRequest(name="digits", seed=7),
                      backbones=("tinywide",))
    fp = fingerprint(cfg, BACKBONES["tinywide"], "fp32")
    path = cache_file(cfg.cache_dir, dataset_key(cfg.data), "tinywide", fp)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 0.06, (classes, dim)).astype(np.float32)
    labels = {"train": rng.integers(0, classes, n_train), "test": rng.integers(0, classes, n_test)}
    writer = CacheWriter(path, fp, {s: (y, np.arange(len(y))) for s, y in labels.items()},
                         {"stage1": 8, "stage2": 12, "stage3": dim}, "float16", [str(c) for c in range(classes)], {})
    for split, y in labels.items():
        for start in range(0, len(y), 10_000):
            rows = y[start : start + 10_000]
            big = (means[rows] + rng.normal(0, 1, (len(rows), dim)).astype(np.float32)).astype(np.float16)
            small = {t: rng.normal(0, 1, (len(rows), d)).astype(np.float16) for t, d in (("stage1", 8), ("stage2", 12))}
            writer.write(split, start, {"stage3": big, **small})
    writer.finish()
    return cfg.cache_dir, path


def test_streamed_rows_and_normaliser_equal_the_in_memory_ones(tmp_path):
    cache_dir, path = synthetic_cache(tmp_path, 3000, 500)
    rows = np.sort(np.random.default_rng(1).choice(3000, 2000, replace=False))
    with FeatureCache(path) as cache:
        refs = [TapRef("tinywide", "stage1"), TapRef("tinywide", "stage3")]
        stream = FusedRows({"tinywide": cache}, refs, "train", rows, chunk_rows=257)  # many uneven chunks
        streamed = fit_normalizer("standard", stream)
        blocks = [cache.read("train", r.tap).astype(np.float32)[rows] for r in refs]
        loaded = TapNormalizer("standard").fit(blocks)
        for a, b in zip(streamed.mean_ + streamed.scale_, loaded.mean_ + loaded.scale_):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        X = np.concatenate([c for c, _ in stream.with_normalizer(loaded).chunks()])
        np.testing.assert_array_equal(X, loaded.transform(blocks))
        import torch

        seen = np.concatenate([p for _, p in stream.with_normalizer(loaded).chunks(torch.Generator().manual_seed(0))])
        assert sorted(seen) == list(range(len(rows))) and list(seen) != list(range(len(rows)))  # shuffled chunks


def test_out_of_core_refuses_scikit_learn_heads():
    result = CliRunner().invoke(cli, ["fuse-train", *FLAGS, "--head", "logreg", "--out-of-core"])
    assert result.exit_code == 2
    assert "--out-of-core streams features to the torch heads (linear, mlp); logreg needs them in memory" in result.output


MEASURE = """
import sys
sys.path.insert(0, {tests!r})
import tiny
from featcache.cli.commands import cli
cli.main({args!r}, standalone_mode=False)
print("VmData", [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmData")][0])
"""


def capped(limit):
    def apply():
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    return apply


def test_out_of_core_trains_under_a_memory_cap_the_in_memory_path_cannot(tmp_path):
    n_train, n_test, dim = 30_000, 3_000, tiny.WIDE
    cache_dir, path = synthetic_cache(tmp_path, n_train, n_test)
    matrix = n_train * dim * 4  # the fused training matrix in float32: 123 MB
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # thread stacks count against the cap: keep them fixed
    common = ["fuse-train", *FLAGS, "--head", "linear", "--epochs", "2", "--batch-size", "1024", "--lr", "1e-3",
              "--weight-decay", "0"]  # one candidate: what is measured is memory
    # What the same command holds with a small cache: the interpreter, torch, scikit-learn, one chunk.
    small_dir, _ = synthetic_cache(tmp_path / "small", 2000, 200)
    small = [*common, "--cache-dir", str(small_dir), "--runs-dir", str(tmp_path / "small-runs"), "--out-of-core"]
    measured = subprocess.run([sys.executable, "-c", MEASURE.format(tests=str(TESTS_DIR), args=small)],
                              capture_output=True, text=True, env=env, check=True)
    baseline = int(measured.stdout.split("VmData")[-1])
    limit = baseline + matrix // 2  # the cap leaves room for less than the feature matrix
    args = [sys.executable, str(TESTS_DIR / "run_cli.py"), *common, "--cache-dir", str(cache_dir)]

    def fuse(tag, *extra, limit=None):
        done = subprocess.run([*args, "--runs-dir", str(tmp_path / tag), *extra], capture_output=True, text=True,
                              preexec_fn=capped(limit) if limit else None, timeout=600, env=env)
        return done

    in_memory_capped = fuse("capped", limit=limit)
    assert in_memory_capped.returncode == 2  # the cap binds: loading the taps fails, in one line
    assert "the cached taps do not fit in memory (0.1 GiB as float32): add --out-of-core" in in_memory_capped.stderr
    assert len(in_memory_capped.stderr.strip().splitlines()) == 1
    streamed = fuse("streamed", "--out-of-core", limit=limit)
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    reference = CliRunner().invoke(cli, [*common[:], "--cache-dir", str(cache_dir), "--runs-dir",
                                         str(tmp_path / "reference")])  # uncapped: in this process, no start-up
    assert reference.exit_code == 0, reference.output[-2000:]
    acc = {}
    for tag in ("streamed", "reference"):
        [record] = (tmp_path / tag).glob("*/record.json")
        acc[tag] = json.loads(record.read_text())["metrics"]["accuracy"]
    print(f"cap {limit / 2**20:.0f} MiB (baseline {baseline / 2**20:.0f} + {matrix // 2 / 2**20:.0f}); accuracy {acc}")
    assert acc["reference"] > 0.5  # the synthetic task is learnable
    assert abs(acc["streamed"] - acc["reference"]) <= 0.01, acc
