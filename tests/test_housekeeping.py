"""``featcache cache list|prune``: what a cache folder holds, what uses each file, removing only what was named."""

import fcntl
import json
import os
import time
from types import SimpleNamespace

from click.testing import CliRunner
from featcache.cli.commands import cli
from featcache.extraction.store import timing_file


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _cache(path, complete=True):
    """A finished featcache cache as far as listing reads one: its name and attributes (the layout's own test is
    tests/test_store.py), and its timing file."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["fingerprint"] = "{}"
        f.attrs["complete"] = complete
        f.create_dataset("train/taps/stage3", data=[[0.5] * 16] * 40)
    timing_file(path).write_text("{}")
    return path


def test_list_and_prune_by_age_size_and_use_never_touch_other_files_or_a_cache_being_written(tmp_path):
    runs, cache_dir = tmp_path / "runs", tmp_path / "cache"
    used_path = _cache(cache_dir / "digits" / "tiny-aaaaaaaaaaaa.h5")
    old = SimpleNamespace(path=_cache(cache_dir / "digits" / "tiny-bbbbbbbbbbbb.h5"))
    (runs / "run1").mkdir(parents=True)  # a run that read the first cache, by its path on another machine
    (runs / "run1" / "record.json").write_text(json.dumps({"caches": {"tiny": {"path": "/elsewhere/tiny-aaaaaaaaaaaa.h5"}}}))
    (runs / "sweeps" / "s1").mkdir(parents=True)  # and a sweep, by file name
    (runs / "sweeps" / "s1" / "sweep.json").write_text(json.dumps({"caches": ["tiny-aaaaaaaaaaaa.h5"]}))
    (runs / "ranks" / "r1").mkdir(parents=True)  # and a ranking, whose --confirm reads its models' caches
    (runs / "ranks" / "r1" / "rows.jsonl").write_text(json.dumps({"model": "tiny", "cache": "/x/tiny-aaaaaaaaaaaa.h5"})
                                                      + "\n" + json.dumps({"model": "bad", "status": "failed"}) + "\n")
    week_ago = time.time() - 8 * 86400
    os.utime(old.path, (week_ago, week_ago))
    partial = old.path.with_name("tiny2-0123456789ab.h5.partial")
    partial.write_bytes(b"unfinished")
    stranger = cache_dir / "digits" / "notes.h5"  # not a name featcache gives a cache: never listed nor removed
    stranger.write_bytes(b"mine")

    listed = invoke("cache", "list", "--cache-dir", cache_dir, "--runs-dir", runs)
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert len(lines) == 4 and "3 cache files" in lines[-1] and "2 unused by any run, sweep or ranking" in lines[-1]
    assert "8d  complete  unused" in lines[0] and old.path.name in lines[0]  # oldest first
    assert "3 users" in listed.output and "partial" in listed.output and "notes.h5" not in listed.output
    records = json.loads(invoke("cache", "list", "--cache-dir", cache_dir, "--runs-dir", runs, "--json").output)
    assert [r["path"] for r in records if r["users"]] == [str(used_path)]

    dry = invoke("cache", "prune", "--cache-dir", cache_dir, "--runs-dir", runs, "--unused", "--dry-run")
    assert dry.exit_code == 0 and "2 cache files, would free" in dry.output and old.path.exists() and partial.exists()
    # by age and unused: only the week-old cache, its timing file with it
    assert timing_file(old.path).exists()
    aged = invoke("cache", "prune", "--cache-dir", cache_dir, "--runs-dir", runs, "--unused", "--older-than", "7d")
    assert aged.exit_code == 0 and f"removed {old.path}" in aged.output
    assert not old.path.exists() and not timing_file(old.path).exists() and partial.exists()
    # a partial another process is writing (its lock held) is left alone
    lock = partial.with_name("tiny2-0123456789ab.h5.lock")
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        busy = invoke("cache", "prune", "--cache-dir", cache_dir, "--runs-dir", runs, "--unused")
    assert "another featcache process is writing it" in busy.output and partial.exists()
    invoke("cache", "prune", "--cache-dir", cache_dir, "--runs-dir", runs, "--larger-than", "1")
    assert not partial.exists() and not used_path.exists() and stranger.read_bytes() == b"mine"


def test_bad_prune_requests_are_one_line_and_remove_nothing(tmp_path):
    (tmp_path / "cache").mkdir()
    for args, message in ((["--dry-run"], "needs at least one of --older-than, --larger-than, --unused"),
                          (["--older-than", "soon"], "--older-than takes an age such as 30d"),
                          (["--larger-than", "big"], "--larger-than takes a size such as 500M")):
        done = invoke("cache", "prune", "--cache-dir", tmp_path / "cache", *args)
        assert done.exit_code == 2 and message in done.output and len(done.output.strip().splitlines()) == 1
    missing = invoke("cache", "list", "--cache-dir", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "no cache folder" in missing.output
