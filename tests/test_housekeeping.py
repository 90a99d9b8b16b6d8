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


def _cache(folder, backbone="tiny", seed=0, complete=True, partial=False):
    """A featcache cache as far as listing reads one: its name (BACKBONE-HASH.h5, the hash its stored fingerprint's),
    its attributes (the layout's own test is tests/test_store.py) and its timing file."""
    import h5py

    from featcache.extraction.store import FORMAT, canonical, fingerprint_hash

    fingerprint = canonical({"seed": seed})  # as the store writes it
    path = folder / f"{backbone}-{fingerprint_hash({'seed': seed})[:12]}.h5{'.partial' * partial}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["fingerprint"] = fingerprint
        f.attrs["format"] = FORMAT
        f.attrs["complete"] = complete
        f.create_dataset("train/taps/stage3", data=[[0.5] * 16] * 40)
    if not partial:
        timing_file(path).write_text("{}")
    return path


def test_list_and_prune_by_age_size_and_use_never_touch_other_files_or_a_cache_being_written(tmp_path):
    runs, cache_dir = tmp_path / "runs", tmp_path / "cache"
    used_path = _cache(cache_dir / "digits", seed=1)
    used = used_path.name
    old = SimpleNamespace(path=_cache(cache_dir / "digits", seed=2))
    (runs / "run1").mkdir(parents=True)  # a run that read the first cache, by its path on another machine
    (runs / "run1" / "record.json").write_text(json.dumps({"caches": {"tiny": {"path": f"/elsewhere/{used}"}}}))
    (runs / "sweeps" / "s1").mkdir(parents=True)  # and a sweep, by file name
    (runs / "sweeps" / "s1" / "sweep.json").write_text(json.dumps({"caches": [used]}))
    (runs / "ranks" / "r1").mkdir(parents=True)  # and a ranking, whose --confirm reads its models' caches
    (runs / "ranks" / "r1" / "rows.jsonl").write_text(json.dumps({"model": "tiny", "cache": f"/x/{used}"})
                                                      + "\n" + json.dumps({"model": "bad", "status": "failed"}) + "\n")
    week_ago = time.time() - 8 * 86400
    os.utime(old.path, (week_ago, week_ago))
    partial = _cache(cache_dir / "digits", "tiny2", seed=3, complete=False, partial=True)
    stranger = cache_dir / "digits" / "notes.h5"  # not a name featcache gives a cache: never listed nor removed
    stranger.write_bytes(b"mine")
    import h5py  # a user's own HDF5 file whose name looks like a cache's: listed as foreign, never removed

    lookalike = cache_dir / "digits" / "mine-0123456789ab.h5"
    with h5py.File(lookalike, "w") as f:
        f.attrs["fingerprint"] = "{}"  # even with featcache's attribute: its hash is not the name's

    listed = invoke("cache", "list", "--cache-dir", cache_dir, "--runs-dir", runs)
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert len(lines) == 5 and "4 cache files" in lines[-1] and "3 unused by any run, sweep or ranking" in lines[-1]
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
    lock = partial.with_name(partial.name.replace(".partial", ".lock"))
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        busy = invoke("cache", "prune", "--cache-dir", cache_dir, "--runs-dir", runs, "--unused")
    assert "another featcache process is writing it" in busy.output and partial.exists()
    invoke("cache", "prune", "--cache-dir", cache_dir, "--runs-dir", runs, "--larger-than", "1")
    assert not partial.exists() and not used_path.exists() and stranger.read_bytes() == b"mine"
    assert lookalike.exists()


def test_prune_refuses_the_filesystem_root_and_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for folder in ("/", tmp_path):
        done = invoke("cache", "prune", "--cache-dir", folder, "--older-than", "1d")
        assert done.exit_code == 2 and ("the filesystem root" if folder == "/" else "the home folder") in done.output
        assert len(done.output.strip().splitlines()) == 1


def test_bad_prune_requests_are_one_line_and_remove_nothing(tmp_path):
    (tmp_path / "cache").mkdir()
    for args, message in ((["--dry-run"], "needs at least one of --older-than, --larger-than, --unused"),
                          (["--older-than", "soon"], "--older-than takes an age such as 30d"),
                          (["--larger-than", "big"], "--larger-than takes a size such as 500M")):
        done = invoke("cache", "prune", "--cache-dir", tmp_path / "cache", *args)
        assert done.exit_code == 2 and message in done.output and len(done.output.strip().splitlines()) == 1
    missing = invoke("cache", "list", "--cache-dir", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "no cache folder" in missing.output
