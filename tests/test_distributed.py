"""torchrun extraction: several CPU processes (gloo) write one cache identical to a single process's."""

import os
import subprocess
import sys

import pytest
from conftest import TESTS_DIR

from featcache.extraction.distributed import shard_rows
from featcache.torchrun import Ranks
from featcache.extraction.reader import FeatureCache

ARGS = ["extract", "--backbone", "tiny", "--weights", "random", "--image-size", "32", "--batch-size", "16",
        "--device", "cpu", "-q", "--limit-train", "150", "--limit-test", "10", "--num-workers", "0"]


@pytest.mark.parametrize("n, batch, world", [(300, 16, 2), (100, 16, 3), (5, 16, 2), (1797, 64, 4)])
def test_shards_are_contiguous_whole_batches_covering_every_row(n, batch, world):
    shards = [shard_rows(n, batch, Ranks(r, world)) for r in range(world)]
    assert shards[0][0] == 0 and shards[-1][1] == n
    for (a, b), (c, _) in zip(shards, shards[1:]):
        assert b == c and (b % batch == 0 or b == n) and a <= b


def test_torchrun_with_more_ranks_than_batches_gives_the_single_process_cache(tmp_path):
    """Two ranks; the test split (10 images) is one batch of 16, so one rank's shard of it is empty."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_cli = [sys.executable, str(TESTS_DIR / "run_cli.py")]
    single = subprocess.run([*run_cli, *ARGS, "--cache-dir", str(tmp_path / "single")], capture_output=True,
                            text=True, env=env)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    multi = subprocess.run([*torchrun, str(TESTS_DIR / "run_cli.py"), *ARGS, "--cache-dir", str(tmp_path / "multi")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert multi.stdout.count("tiny: extracted 160 images") == 1  # rank 0 speaks for the job, with every rank's rows
    [a] = (tmp_path / "single" / "digits").glob("*.h5")
    [b] = (tmp_path / "multi" / "digits").glob("*.h5")
    assert a.name == b.name
    assert a.read_bytes() == b.read_bytes()
    assert not [p for p in b.parent.iterdir() if ".rank" in p.name]  # shard files are cleaned up
    with FeatureCache(b) as cache:
        assert cache.complete and len(cache.labels("train")) == 150
