import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import TESTS_DIR, tiny_config

from featcache.config import PreprocessConfig
from featcache.datasets import DataRequest
from featcache.errors import FeatcacheError
from featcache.extract import extract
from featcache.store import CacheWriter, FeatureCache, partial_file

ARGS = ["extract", "--backbone", "tiny", "--weights", "random", "--image-size", "48", "--batch-size", "4",
        "--device", "cpu", "-q"]


def cli(cache_dir, *extra):
    return [sys.executable, str(TESTS_DIR / "run_cli.py"), *ARGS, "--cache-dir", str(cache_dir), *extra]


def equal_caches(a, b):
    with FeatureCache(a) as x, FeatureCache(b) as y:
        assert x.fingerprint == y.fingerprint
        for split in x.splits:
            assert np.array_equal(x.labels(split), y.labels(split))
            for tap in x.taps(split):
                assert np.array_equal(x.read(split, tap), y.read(split, tap)), (split, tap)


def reference(tmp_path):
    cfg = tiny_config(tmp_path / "ref", data=DataRequest(name="digits"), preprocess=PreprocessConfig(image_size=48),
                      batch_size=4)
    [ref] = extract(cfg, progress=False)
    return ref.path


def test_sigkill_then_resume_gives_the_uninterrupted_arrays_and_bytes(tmp_path):
    ref = reference(tmp_path)
    rng = random.Random(0)
    kills = 0
    cache = tmp_path / "killed"
    final = cache / "digits" / ref.name
    for attempt in range(6):
        if final.exists():
            break
        proc = subprocess.Popen(cli(cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not partial_file(final).exists() and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not final.exists():
            kills += 1
            assert partial_file(final).exists()
            with pytest.raises(FeatcacheError, match="is not finished"):
                FeatureCache(partial_file(final))
        if kills >= 3:
            break
    assert kills >= 1, "no kill landed mid-extraction"
    done = subprocess.run(cli(cache), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stdout or "extracted" in done.stdout
    assert not partial_file(final).exists()
    equal_caches(ref, final)
    assert final.read_bytes() == ref.read_bytes()


def test_two_concurrent_extractions_do_not_corrupt_the_cache(tmp_path):
    ref = reference(tmp_path)
    cache = tmp_path / "shared"
    procs = [subprocess.Popen(cli(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("already cached" in out for out, _ in outs) == 1
    equal_caches(ref, cache / "digits" / ref.name)


def test_a_partial_file_of_another_request_is_discarded(tmp_path):
    labels, index = np.arange(4), np.arange(4)
    path = tmp_path / "x.h5"
    writer = CacheWriter(path, {"a": 1}, {"train": (labels, index)}, {"t": 2}, "float16", ["c"], {})
    writer.write("train", 0, {"t": np.ones((2, 2), np.float16)})
    writer.close()
    again = CacheWriter(path, {"a": 2}, {"train": (labels, index)}, {"t": 2}, "float16", ["c"], {})
    assert again.rows_done("train") == 0 and not again.resumed
    again.close()
    resumed = CacheWriter(path, {"a": 2}, {"train": (labels, index)}, {"t": 2}, "float16", ["c"], {})
    assert not resumed.resumed
    resumed.write("train", 0, {"t": np.ones((4, 2), np.float16)})
    assert resumed.finish() == path and not partial_file(path).exists()


def test_a_garbled_partial_file_starts_over(tmp_path):
    path = tmp_path / "x.h5"
    partial_file(path).write_bytes(b"\x89HDF\r\n garbage")
    writer = CacheWriter(path, {"a": 1}, {"train": (np.arange(2), np.arange(2))}, {"t": 1}, "float16", ["c"], {})
    assert writer.rows_done("train") == 0
    writer.close()


def test_foreign_or_unfinished_files_are_never_read_as_caches(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(FeatcacheError, match="not a featcache cache"):
        FeatureCache(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(FeatcacheError, match="not a readable HDF5 feature cache"):
        FeatureCache(tmp_path / "text.h5")
    with pytest.raises(FeatcacheError, match="no cache file at"):
        FeatureCache(tmp_path / "missing.h5")
