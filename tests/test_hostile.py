"""Shared files and second processes: a cache, pipeline file or sweep folder from someone else, or a second
process on the same files, never overwrites, corrupts, crashes or counts twice (issue 29's audit cases)."""

import json
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from featcache.cli.commands import cli

FLAGS = ["--backbone", "tiny", "--weights", "random", "--image-size", "32", "--device", "cpu", "--dtype", "float32",
         "--limit-train", "120", "--limit-test", "40"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line(result, pattern):
    import re

    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and re.search(pattern, lines[0]), result.output


@pytest.fixture
def cache(tmp_path):
    """A finished cache of FLAGS in tmp_path/cache, and its path."""
    assert invoke("extract", *FLAGS, "--cache-dir", tmp_path / "cache", "-q").exit_code == 0
    [path] = (tmp_path / "cache").rglob("*.h5")
    return path


def test_a_cache_of_another_request_under_this_requests_name_is_refused(tmp_path, cache):
    other = tmp_path / "other"
    assert invoke("extract", *FLAGS[:-2], "--limit-test", "30", "--cache-dir", other, "-q").exit_code == 0
    [foreign] = other.rglob("*.h5")
    shutil.copy(foreign, cache)  # a valid cache, but of --limit-test 30
    message = r"holds another request's features \(its stored fingerprint differs from this request's\)"
    one_line(invoke("fuse-train", *FLAGS, "--cache-dir", tmp_path / "cache", "--runs-dir", tmp_path / "runs"), message)
    one_line(invoke("extract", *FLAGS, "--cache-dir", tmp_path / "cache"), message)
    assert not (tmp_path / "runs").exists()


def test_non_finite_values_in_a_cache_are_named_by_every_reader(tmp_path, cache):
    with h5py.File(cache, "r+") as f:
        data = f["train/taps/stage2"]
        block = data[:5]
        block[:, :3] = np.nan
        data[:5] = block
    message = r"tap tiny:stage2 in .* holds 15 non-finite values \(NaN or infinity\) in 5 train rows: the file is damaged"
    runs = tmp_path / "runs"
    one_line(invoke("fuse-train", *FLAGS, "--taps", "mid", "--cache-dir", tmp_path / "cache", "--runs-dir", runs),
             message)
    one_line(invoke("sweep", *FLAGS, "--combos", "singles", "--head", "logreg", "--cache-dir", tmp_path / "cache",
                    "--runs-dir", runs), message)
    shown = invoke("info", cache)
    assert shown.exit_code == 0 and "15 stored values are not finite" in shown.output, shown.output


def test_an_absurd_declared_shape_is_refused_before_anything_is_allocated(tmp_path, cache):
    import resource

    with h5py.File(cache, "r+") as f:
        del f["train/taps/stage3"]
        f["train/taps"].create_dataset("stage3", shape=(120, 2_000_000_000), dtype="float16", chunks=(1, 1 << 20))
    assert cache.stat().st_size < 5_000_000
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (24 << 30, hard))  # 2 TiB would fail here, not swap
    try:
        message = r"damaged feature cache \(train tap stage3 has shape \(120, 2000000000\), its fingerprint declares"
        one_line(invoke("info", cache), message)
        one_line(invoke("sweep", *FLAGS, "--combos", "singles", "--head", "logreg", "--cache-dir", tmp_path / "cache",
                        "--runs-dir", tmp_path / "runs"), message)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_a_cache_without_a_train_split_or_with_broken_metadata_is_one_line(tmp_path, cache):
    broken = tmp_path / "broken.h5"
    shutil.copy(cache, broken)
    with h5py.File(broken, "r+") as f:
        del f["train"]
    one_line(invoke("info", broken), r"broken.h5 is a damaged feature cache \(no train split\)")
    with h5py.File(broken, "r+") as f:
        f.attrs["fingerprint"] = '{"format": 3, "taps": [[broken'
    one_line(invoke("info", broken), r"broken.h5 is a damaged feature cache \(its fingerprint is not JSON")


PIPELINE = """
[pipeline]
name = "{name}"

[defaults]
backbone = ["tiny"]
weights = "random"
image-size = 32
device = "cpu"
limit-train = 120
limit-test = 40
{defaults}

[[fuse-train]]
extract = true

[report]
gradcam-images = 0
grid-images = 2
{report}
"""


@pytest.mark.parametrize(("name", "defaults", "report", "message"), [
    ("x", "", 'out = "{victim}"', r"\[report\] out: '/.*victim.txt' leaves the folder featcache runs in"),
    ("../../escaped", "", "", r"\[pipeline\] name: must be a plain name .* Got '../../escaped' instead"),
    ("x", 'runs-dir = "../runs"', "", r"\[defaults\] runs-dir: '../runs' leaves the folder featcache runs in"),
    ("x", 'cache-dir = "~/cache"', "", r"\[defaults\] cache-dir: '~/cache' leaves the folder featcache runs in"),
])
def test_a_shared_pipeline_file_writes_only_below_the_folder_it_runs_in(tmp_path, monkeypatch, name, defaults,
                                                                          report, message):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    path = work / "p.toml"
    path.write_text(PIPELINE.format(name=name, defaults=defaults, report=report.format(victim=victim)))
    one_line(invoke("run", path), message)
    assert victim.read_text() == "mine" and not (tmp_path / "victim.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt", "work"]
    assert [p.name for p in work.iterdir()] == ["p.toml"]  # nothing ran


def test_the_command_line_may_name_any_folder_a_pipeline_file_may_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "p.toml"
    path.write_text(PIPELINE.format(name="x", defaults="", report=""))
    result = invoke("run", path, "--dry-run", "--set", f"runs-dir={tmp_path.parent / 'elsewhere'}")
    assert result.exit_code == 0 and f'runs-dir = "{tmp_path.parent / "elsewhere"}"' in result.output


def test_a_report_never_replaces_a_file_featcache_did_not_write(tmp_path, report_runs):
    runs_dir, _ = report_runs
    mine = tmp_path / "notes.html"
    mine.write_text("<html>my notes</html>")
    flags = ["--runs-dir", runs_dir, "--gradcam-images", "0", "--grid-images", "2"]
    one_line(invoke("report", *flags, "-o", mine), r"notes.html exists and featcache did not write it: choose another "
                                                   r"-o, or pass --force to replace it")
    assert mine.read_text() == "<html>my notes</html>"
    table = tmp_path / "page.csv"
    table.write_text("a,b\n1,2\n")
    one_line(invoke("report", *flags, "-o", tmp_path / "page.html"), r"page.csv exists and featcache did not write it")
    assert table.read_text() == "a,b\n1,2\n" and not (tmp_path / "page.html").exists()
    assert invoke("report", *flags, "-o", mine, "--force").exit_code == 0 and "my notes" not in mine.read_text()
    again = invoke("report", *flags, "-o", mine)  # featcache's own page: replaced without --force
    assert again.exit_code == 0, again.output


def test_four_processes_on_the_same_request_end_as_one(tmp_path):
    """Four identical extracts, then fuse-trains, then sweeps at once: one cache, one run folder, each sweep row
    once and one kept run, the same tables as a single process writes."""
    import pandas as pd
    from test_faults import Forker

    def each(folder):
        cache, runs = folder / "cache", folder / "runs"
        return {"extract": ["extract", *FLAGS, "--cache-dir", cache, "-q"],
                "fuse-train": ["fuse-train", *FLAGS, "--cache-dir", cache, "--runs-dir", runs, "--head", "logreg"],
                "sweep": ["sweep", *FLAGS, "--cache-dir", cache, "--runs-dir", runs / "swept", "--combos", "singles",
                          "--head", "logreg,knn", "--keep", "1", "--seeds", "0,1", "-q"]}

    alone, together = each(tmp_path / "alone"), each(tmp_path / "together")
    forker = Forker()
    try:
        for stage in ("extract", "fuse-train", "sweep"):
            assert forker.run(alone[stage]) == 0, stage
            pids = [forker.start(together[stage]) for _ in range(4)]
            assert [forker.wait(pid) for pid in pids] == [0] * 4, stage
    finally:
        forker.close()
    [one] = (tmp_path / "alone" / "cache").rglob("*.h5")
    [four] = (tmp_path / "together" / "cache").rglob("*.h5")
    with h5py.File(one) as a, h5py.File(four) as b:
        assert all(np.array_equal(a[f"{s}/taps/{t}"][:], b[f"{s}/taps/{t}"][:]) for s in ("train", "test")
                   for t in ("stage1", "stage2", "stage3"))
    runs = [p for p in (tmp_path / "together" / "runs").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert sorted(p.name.split("-", 2)[-1] for p in runs) == ["swept", "tiny-stage3-logreg"]
    [folder] = (tmp_path / "together" / "runs" / "swept" / "sweeps").glob("[!.]*")
    rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]
    keys = [json.dumps([r["seed"], r["taps"], r["head"]]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * 3 * 2  # seeds x taps x heads, each once
    kept = [p for p in (tmp_path / "together" / "runs" / "swept").glob("[!.]*") if p.name != "sweeps"]
    assert len(kept) == 1
    [reference] = (tmp_path / "alone" / "runs" / "swept" / "sweeps").glob("[!.]*")
    columns = ["taps", "head", "chosen", "val_acc", "test_acc", "test_acc_ci", "seeds"]
    assert pd.read_csv(folder / "table.csv")[columns].equals(pd.read_csv(reference / "table.csv")[columns])


def test_a_row_written_twice_counts_once_and_repeated_seeds_are_refused(tmp_path, cache):
    import pandas as pd

    flags = [*FLAGS, "--cache-dir", tmp_path / "cache", "--runs-dir", tmp_path / "runs", "--combos", "singles",
             "--head", "logreg", "--keep", "0", "-q"]
    assert invoke("sweep", *flags, "--seeds", "0,1").exit_code == 0
    [folder] = (tmp_path / "runs" / "sweeps").glob("[!.]*")
    before = pd.read_csv(folder / "table.csv")
    rows = folder / "rows.jsonl"
    rows.write_text(rows.read_text() * 2)  # what two writers without a lock left behind
    assert invoke("sweep", *flags, "--seeds", "0,1").exit_code == 0
    assert pd.read_csv(folder / "table.csv").drop(columns="fit_s").equals(before.drop(columns="fit_s"))
    one_line(invoke("sweep", *flags, "--seeds", "0,0,1"), r"--seeds must list each seed once \(a repeated seed would "
                                                          r"count its rows twice\). Got 0,0,1 instead.")
    one_line(invoke("sweep", *flags, "--seeds", ""), r"--seeds must list at least one seed. Got '' instead.")


def test_one_damaged_run_or_sweep_folder_leaves_the_rest_of_the_report(tmp_path, report_runs):
    source, runs = report_runs
    folder = tmp_path / "runs"
    shutil.copytree(source / "runs", folder)
    assert invoke("sweep", *FLAGS, "--cache-dir", tmp_path / "cache", "--runs-dir", folder, "--combos", "singles",
                  "--head", "logreg", "--keep", "0", "--extract", "-q").exit_code == 0
    copy = {run.name: folder / run.name for run in runs}
    frozen = [c for name, c in copy.items() if "logreg" in name and "early" not in name][0]
    torch_head = [c for name, c in copy.items() if (c / "head.json").is_file()][0]
    garbage = [c for c in copy.values() if c not in (frozen, torch_head)][0]
    import pickle

    (frozen / "normalizer.safetensors").write_bytes(pickle.dumps({"a": 1}))  # a pickle under a safetensors name
    (torch_head / "head.json").write_text('{"classes": "x"}')
    (garbage / "record.json").write_text('{"kind": "frozen", "taps": 3')
    [sweep] = (folder / "sweeps").glob("[!.]*")
    (sweep / "table.csv").write_bytes(bytes(range(256)) * 8)
    page = tmp_path / "r.html"
    result = invoke("report", "--runs-dir", folder, "-o", page, "--grid-images", "2", "--gradcam-images", "1")
    assert result.exit_code == 0, result.output
    html = page.read_text()
    for name in (garbage.name, f"sweeps/{sweep.name}"):
        assert f"<li><code>{name}</code>:" in html  # listed as not shown, with why
    assert f"{frozen / 'normalizer.safetensors'} is damaged or not a file featcache wrote" in html  # its Grad-CAM
    assert f"{torch_head / 'head.json'} is damaged or not a file featcache wrote" in html
    assert html.count('<section class="run"') == len(runs) - 1  # every readable run drawn, the damaged two too
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.new("RGB", (20, 20)).save(photos / "a.png")
    one_line(invoke("predict", "--run", frozen, photos, "--device", "cpu"),
             r"normalizer.safetensors is damaged or not a file featcache wrote \(SafetensorError")
    one_line(invoke("predict", "--run", torch_head, photos, "--device", "cpu"), r"head.json is damaged or not a file")


def test_damaged_sweep_files_are_mended_by_running_the_sweep_again(tmp_path, cache):
    import pandas as pd

    flags = [*FLAGS, "--cache-dir", tmp_path / "cache", "--runs-dir", tmp_path / "runs", "--combos", "singles",
             "--head", "logreg", "--keep", "0", "-q"]
    assert invoke("sweep", *flags).exit_code == 0
    [folder] = (tmp_path / "runs" / "sweeps").glob("[!.]*")
    before = pd.read_csv(folder / "table.csv").drop(columns="fit_s")
    lines = (folder / "rows.jsonl").read_text().splitlines()
    hollow = {**json.loads(lines[0]), "val_acc": None, "test_acc": None}  # its keys, no values
    (folder / "rows.jsonl").write_bytes(b"\xff\xfe\x00garbage\n" + json.dumps(hollow).encode() + b"\n"
                                        + "\n".join(lines[1:]).encode() + b"\n")
    (folder / "sweep.json").write_text('{"caches": ["a')
    again = invoke("sweep", *flags)
    assert again.exit_code == 0, again.output
    assert "resuming: 2 of 3 evaluations are already in" in again.output
    assert pd.read_csv(folder / "table.csv").drop(columns="fit_s").equals(before)
    assert json.loads((folder / "sweep.json").read_text())["weights"] == "random"


@pytest.mark.parametrize(("args", "message"), [
    (["extract", "--image-size", "100000"], r"--image-size must be at most 4096 pixels"),
    (["sweep", "--combos", "40", "--max-combos", "100000000000000"],
     r"--max-combos must lie between 1 and 1,000,000 \(a table longer than that is read by nobody\). Got"),
])
def test_requests_too_large_to_run_are_refused_up_front(tmp_path, args, message):
    command, *rest = args
    flags = [a for a in FLAGS if a not in ("--image-size", "32")]
    one_line(invoke(command, *flags, *rest, "--cache-dir", tmp_path / "cache", "--runs-dir", tmp_path / "runs")
             if command == "sweep" else invoke(command, *flags, *rest, "--cache-dir", tmp_path / "cache"), message)
    assert not any(tmp_path.iterdir())


def test_ctrl_c_during_a_sweep_says_how_to_resume(tmp_path, cache, monkeypatch):
    import featcache.sweeping.run as run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "_evaluate", interrupted)
    result = invoke("sweep", *FLAGS, "--cache-dir", tmp_path / "cache", "--runs-dir", tmp_path / "runs", "--combos",
                    "singles", "--head", "logreg", "-q")
    assert result.exit_code == 130
    assert result.output.strip() == "interrupted: run the same command again: the sweep resumes from the rows it finished"
