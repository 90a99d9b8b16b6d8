import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import TESTS_DIR, tiny_config
from torch import nn

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


class _Times(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def _scaled_spec():
    """tiny with taps far outside float16's range: stage1 near 1e-13 (random efficientnet_b0's late stages), stage2
    back in range (as pretrained taps are), stage3 near 1e8 (over float16's largest, 65,504)."""
    import dataclasses

    import tiny

    from featcache.backbones.registry import BACKBONES, register_backbone

    def build(weights):
        net = tiny.TinyNet()
        net.stage1 = nn.Sequential(net.stage1, _Times(1e-13))
        net.stage2 = nn.Sequential(_Times(1e13), net.stage2)
        net.stage3 = nn.Sequential(net.stage3, _Times(1e8))
        return net

    spec = dataclasses.replace(tiny.TINY, name="tinyscaled", build=build)
    if "tinyscaled" not in BACKBONES:
        register_backbone(spec)
    return spec


def test_float16_storage_keeps_taps_outside_its_range_alive_at_the_same_size(tmp_path):
    """A tap near 1e-13 or 1e8 is stored multiplied by a power of two (the same two bytes a value): read back it
    matches float32 storage to float16's precision (cosine >= 0.9999 per image), no tap is dead or refused; a tap in
    float16's range is stored as before, byte for byte; predict rounds its features as the cache does."""
    from featcache.fuse.predict import as_stored

    _scaled_spec()
    read = {}
    for dtype in ("float16", "float32"):
        cfg = tiny_config(tmp_path, data=DataRequest(name="digits", limit_train=48, limit_test=8), batch_size=16,
                          backbones=("tinyscaled",), dtype=dtype, preprocess=PreprocessConfig(image_size=32))
        [result] = extract(cfg, progress=False, log=lambda m: None)
        with FeatureCache(result.path) as cache:
            assert cache.summary()["dead_taps"] == {}
            read[dtype] = {tap: cache.read("train", tap) for tap in cache.tap_names("train")}
            stored = {tap: cache.file["train"]["taps"][tap] for tap in cache.tap_names("train")}
            assert all(d.dtype == dtype for d in stored.values())
            if dtype == "float16":
                scales = {tap: d.attrs.get("scale") for tap, d in stored.items()}
                assert scales["stage2"] is None and scales["stage1"] > 1e12 and scales["stage3"] < 1e-4
                raw_stage2 = stored["stage2"][:]
    for tap, exact in read["float32"].items():
        assert 1e-15 < np.abs(exact).max() < 1e10
        half = read["float16"][tap].astype(np.float32)
        cosine = (half * exact).sum(1) / np.linalg.norm(half, axis=1) / np.linalg.norm(exact, axis=1)
        assert cosine.min() >= 0.9999, tap
        assert np.allclose(half, exact, rtol=2.0**-10, atol=0), tap  # float16's 11 significant bits
        assert np.array_equal(as_stored(exact, np.float16), half), tap
    assert np.array_equal(raw_stage2, read["float32"]["stage2"].astype(np.float16))
