import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import TESTS_DIR, tiny_config

from featcache.data.datasets import DataRequest
from featcache.data.preprocess import PreprocessConfig
from featcache.errors import FeatcacheError
from featcache.extraction.reader import FeatureCache
from featcache.extraction.run import extract
from featcache.extraction.store import CacheWriter, partial_file

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


def test_two_concurrent_extractions_do_not_corrupt_the_cache(tmp_path):
    ref = reference(tmp_path)
    cache = tmp_path / "shared"
    procs = [subprocess.Popen(cli(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("already cached" in out for out, _ in outs) == 1
    equal_caches(ref, cache / "digits" / ref.name)


def test_different_backbones_extract_concurrently_into_one_folder_and_readers_see_only_finished_files(tmp_path):
    def command(cache_dir, name):
        return [sys.executable, str(TESTS_DIR / "run_cli.py"), "extract", "--backbone", name, "--weights", "random",
                "--image-size", "32", "--limit-train", "400", "--limit-test", "100", "--batch-size", "16",
                "--device", "cpu", "-q", "--cache-dir", str(cache_dir)]

    cache = tmp_path / "shared"
    procs = [subprocess.Popen(command(cache, name), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("resnet18", "mobilenet_v2")]
    seen = 0
    while any(p.poll() is None for p in procs):  # a reader polling the final names meanwhile
        for path in (cache / "digits").glob("*.h5") if (cache / "digits").exists() else []:
            with FeatureCache(path) as reader:  # never a partly written file under a final name
                assert reader.complete and reader.rows_done("train") == 400
                seen += 1
        time.sleep(0.05)
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    finished = sorted(p.name.split("-")[0] for p in (cache / "digits").glob("*.h5"))
    assert finished == ["mobilenet_v2", "resnet18"] and seen > 0
    alone = tiny_config(tmp_path / "alone", data=DataRequest(name="digits", limit_train=400, limit_test=100),
                        backbones=("resnet18", "mobilenet_v2"), batch_size=16)
    for result in extract(alone, progress=False):  # each equals the same backbone extracted on its own
        assert (cache / "digits" / result.path.name).read_bytes() == result.path.read_bytes()


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
