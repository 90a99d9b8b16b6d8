"""Faults: SIGKILL at many random points, a full disk, a read-only cache folder.

Each kill lands on a run forked from a server that imported torch once (tests/fork_server.py),
so twenty kills cost seconds, not minutes of interpreter start-up.
"""

import contextlib
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from conftest import TESTS_DIR, tiny_config
from safetensors.torch import load_file

from featcache.cli.commands import cli
from featcache.data.datasets import DataRequest
from featcache.data.preprocess import PreprocessConfig
from featcache.extraction.run import extract
from featcache.extraction.store import partial_file
from featcache.runs.records import load_record

KILLS = 20


class Forker:
    """Starts featcache runs as children of the fork server; they can be SIGKILLed and awaited."""

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.server = subprocess.Popen([sys.executable, str(TESTS_DIR / "fork_server.py")], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=env)

    def _ask(self, line: str) -> int:
        self.server.stdin.write(line + "\n")
        self.server.stdin.flush()
        return int(self.server.stdout.readline().split()[1])

    def start(self, args) -> int:
        return self._ask("run " + json.dumps([str(a) for a in args]))

    def wait(self, pid: int) -> int:
        return self._ask(f"wait {pid}")

    def run(self, args) -> int:
        return self.wait(self.start(args))

    def close(self):
        self.server.stdin.close()
        self.server.wait(timeout=30)


@pytest.fixture(scope="module")
def forker():
    f = Forker()
    yield f
    f.close()


def kill_rounds(forker, args_for, started, finished, resume_args=(), rounds=12, per_round=5, seed=0, needed=KILLS):
    """Kill runs at random moments until ``needed`` kills landed mid-run; finish every round.

    ``args_for(round)`` gives a round's command; ``started(round)`` says its work file
    exists; ``finished(round)`` that the result is in place. Yields each finished round.
    """
    rng = random.Random(seed)
    kills = 0
    for r in range(rounds):
        landed = 0
        while landed < per_round and kills < needed:
            pid = forker.start([*args_for(r), *(resume_args if landed or r else ())])
            deadline = time.time() + 60
            while not started(r) and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.35))
            os.kill(pid, signal.SIGKILL)
            forker.wait(pid)
            if finished(r):
                break  # the run won the race: this round ends here
            landed += 1
            kills += 1
        assert forker.run([*args_for(r), *resume_args]) == 0
        yield r, landed
        if kills >= needed:
            break
    assert kills >= needed, f"only {kills} kills landed mid-run"


EXTRACT = ["extract", "--backbone", "tiny", "--weights", "random", "--image-size", "48", "--batch-size", "4",
           "--device", "cpu", "-q", "--num-workers", "0"]


def test_twenty_sigkills_during_extraction_each_resume_to_the_uninterrupted_bytes(tmp_path, forker):
    cfg = tiny_config(tmp_path / "ref", data=DataRequest(name="digits"), preprocess=PreprocessConfig(image_size=48),
                      batch_size=4)
    [ref] = extract(cfg, progress=False)
    reference = ref.path.read_bytes()

    def final(r):
        return tmp_path / f"round{r}" / "digits" / ref.path.name

    rounds = kill_rounds(forker, lambda r: [*EXTRACT, "--cache-dir", tmp_path / f"round{r}"],
                         started=lambda r: partial_file(final(r)).exists(), finished=lambda r: final(r).exists())
    checked = 0
    for r, landed in rounds:
        assert final(r).read_bytes() == reference, f"round {r} after {landed} kills"
        assert not partial_file(final(r)).exists()
        checked += 1
    assert checked >= 2


def test_sigkills_during_a_shared_pass_of_two_backbones_resume_to_the_uninterrupted_bytes(tmp_path, forker):
    """The backbones of one pass may stop at different rows; a resume brings both to the same bytes."""
    # long enough (about a second) that most kills land mid-run, between the writer's commits
    cfg = tiny_config(tmp_path / "ref", data=DataRequest(name="digits", limit_train=1500, limit_test=100),
                      preprocess=PreprocessConfig(image_size=48), batch_size=4, backbones=("tiny", "tiny2"))
    refs = extract(cfg, progress=False)
    args = [*EXTRACT, "--backbone", "tiny2", "--limit-train", "1500", "--limit-test", "100"]

    def final(r, ref):
        return tmp_path / f"round{r}" / "digits" / ref.path.name

    rounds = kill_rounds(forker, lambda r: [*args, "--cache-dir", tmp_path / f"round{r}"],
                         started=lambda r: partial_file(final(r, refs[0])).exists(),
                         finished=lambda r: all(final(r, ref).exists() for ref in refs), rounds=4, per_round=3,
                         needed=8)
    checked = 0
    for r, landed in rounds:
        for ref in refs:
            assert final(r, ref).read_bytes() == ref.path.read_bytes(), f"round {r} after {landed} kills"
        checked += 1
    assert checked >= 2


FINETUNE = ["finetune", "--backbone", "tiny", "--weights", "random", "--image-size", "32", "--device", "cpu",
            "--limit-train", "600", "--limit-test", "60", "--hidden", "16", "--epochs", "8", "--batch-size", "8",
            "--num-workers", "0", "--unfreeze", "last-2", "--augment", "basic", "--lr", "1e-3", "-q"]


def model_of(runs_dir):
    [run] = [p for p in runs_dir.iterdir() if not p.name.startswith(".")]
    return load_file(run / "model.safetensors"), load_record(run)


def test_twenty_sigkills_during_fine_tuning_each_resume_to_the_uninterrupted_weights(tmp_path, forker):
    assert forker.run([*FINETUNE, "--runs-dir", tmp_path / "ref"]) == 0
    ref_weights, ref_record = model_of(tmp_path / "ref")

    def runs(r):
        return tmp_path / f"round{r}"

    def started(r):
        return bool(list(runs(r).glob(".finetune-*.partial/checkpoint.pt")))

    def finished(r):
        return runs(r).is_dir() and any(not p.name.startswith(".") for p in runs(r).iterdir())

    for r, landed in kill_rounds(forker, lambda r: [*FINETUNE, "--runs-dir", runs(r)], started, finished,
                                 resume_args=("--resume",), seed=1):
        weights, record = model_of(runs(r))
        assert weights.keys() == ref_weights.keys()
        assert all(torch.equal(weights[k], ref_weights[k]) for k in weights), f"round {r} after {landed} kills"
        assert record["curves"]["val_loss"] == ref_record["curves"]["val_loss"]
        assert not list(runs(r).glob(".finetune-*.partial"))


@contextlib.contextmanager
def mounted(options: list[str], target, source="tmpfs"):
    """A mount for the test (root only: CI and this project's machines run as root)."""
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", *options, source, str(target)], capture_output=True, text=True)
    if done.returncode != 0:  # not root, or a sandbox without CAP_SYS_ADMIN: said in the -ra summary
        pytest.skip(f"cannot mount here ({done.stderr.strip()}); the patched ENOSPC test still checks the message")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def one_line(result, pattern):
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert re.search(pattern, line), line


def no_cache_files(folder):
    return not [p for p in folder.rglob("*") if p.suffix in (".h5", ".partial")]


def test_a_full_disk_is_one_line_and_leaves_no_cache_file(tmp_path):
    with mounted(["-t", "tmpfs", "-o", "size=64k"], tmp_path / "small") as disk:
        result = CliRunner().invoke(cli, [*EXTRACT, "--cache-dir", str(disk / "cache")])
        one_line(result, r"^Error: the disk is full: cannot write .*\.partial; free some space or choose another "
                         r"--cache-dir, then run the same command again$")
        assert no_cache_files(disk)


def test_the_disk_filling_up_during_writes_is_one_line_and_leaves_no_cache_file(tmp_path, monkeypatch):
    import h5py

    calls = {"n": 0}
    original = h5py.Dataset.__setitem__

    def fill_up(self, key, value):
        calls["n"] += 1
        if calls["n"] > 4:  # a few slice writes in (the batches held in memory are written a commit at a time)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", fill_up)
    result = CliRunner().invoke(cli, [*EXTRACT, "--cache-dir", str(tmp_path / "cache")])
    one_line(result, r"^Error: the disk is full: cannot write")
    assert calls["n"] > 4 and no_cache_files(tmp_path)


def test_a_read_only_cache_folder_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "ro" / "digits").mkdir(parents=True)
    with mounted(["--bind"], tmp_path / "ro", source=str(tmp_path / "ro")) as folder:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        existing = CliRunner().invoke(cli, [*EXTRACT, "--cache-dir", str(folder)])
        one_line(existing, r"^Error: cannot write in cache folder .*/ro/digits: Read-only file system; choose "
                           r"another --cache-dir$")
        fresh = CliRunner().invoke(cli, [*EXTRACT, "--cache-dir", str(folder / "new")])
        one_line(fresh, r"^Error: cannot create cache folder .*/ro/new/digits: Read-only file system")
        assert no_cache_files(folder)
