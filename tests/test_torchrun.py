"""sweep under torchrun: two CPU processes (gloo) share the combinations and write the table one process writes."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from conftest import TESTS_DIR

from featcache.sweeping.tables import read_rows, row_key

COMMON = ["--weights", "random", "--image-size", "32", "--device", "cpu", "--limit-train", "150", "--limit-test", "40",
          "-q"]
DATA = ["--backbone", "tiny", *COMMON]
EXTRACT = ["extract", *DATA, "--batch-size", "16", "--num-workers", "0"]
SWEEP = ["sweep", *DATA, "--head", "logreg", "--head", "svm", "--head", "knn", "--score", "logme", "--seeds", "0,1",
         "--keep", "1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TIMED = ["fit_s"]  # the only columns allowed to differ: seconds


def _run(command, env=ENV):
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def _folder(runs):
    [folder] = [p for p in (runs / "sweeps").iterdir() if p.is_dir()]
    return folder


def _table(folder, name="table.csv"):
    return pd.read_csv(folder / name).drop(columns=TIMED, errors="ignore")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchrun") / "cache"
    extracted = _run([sys.executable, str(TESTS_DIR / "run_cli.py"), *EXTRACT, "--cache-dir", str(folder)])
    assert extracted.returncode == 0, extracted.stderr[-2000:]
    return ["--cache-dir", str(folder)]


def test_a_two_rank_sweep_writes_the_one_process_table_and_a_killed_ranks_rows_are_kept(tmp_path, cache):
    """Batches of at most 1.5 MB: one process solves the logregs in several batches, which the ranks share whole
    (a problem's numbers depend on its batch)."""
    env = {**ENV, "TEST_BATCH_BYTES": str(3 << 19)}
    single = _run([sys.executable, str(TESTS_DIR / "run_cli.py"), *SWEEP, *cache, "--runs-dir", str(tmp_path / "one")],
                  env)
    assert single.returncode == 0, single.stderr[-3000:]
    one = _folder(tmp_path / "one")

    # a torchrun job killed before: rank 1 of 2 had written three rows, the last cut short by the kill
    two = tmp_path / "two" / "sweeps" / one.name
    two.mkdir(parents=True)
    lines = (one / "rows.jsonl").read_text().splitlines()
    (two / "rows.rank1of2.jsonl").write_text("\n".join(lines[3:5]) + "\n" + lines[5][:40])
    multi = _run([*TORCHRUN, str(TESTS_DIR / "run_cli.py"), *SWEEP, *cache, "--runs-dir", str(tmp_path / "two")], env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert f"{len(lines) - 2} evaluations in" in multi.stdout and "on 2 processes" in multi.stdout  # not the kept 2
    assert multi.stdout.count("sweep written to") == 1  # rank 0 speaks for the job
    assert not list(two.glob("rows.rank*"))  # folded into rows.jsonl
    rows = read_rows(two)
    assert len(rows) == len(lines) == len({row_key(r) for r in rows})  # every row once
    assert sorted(map(row_key, rows)) == sorted(map(row_key, read_rows(one)))
    for name in ("table.csv", "scores.csv"):
        pd.testing.assert_frame_equal(_table(two, name), _table(one, name))
    assert len(list((tmp_path / "two").glob("*/record.json"))) == 1  # the kept run, trained once, by rank 0


def test_ranks_that_disagree_or_miss_a_cache_fail_together_in_one_line(tmp_path, cache):
    script = tmp_path / "by_rank.py"  # rank 1 is started with other flags than rank 0
    script.write_text(f"import os, sys\nsys.path.insert(0, {str(TESTS_DIR)!r})\nimport tiny  # noqa\n"
                      "from featcache.cli.commands import main\n"
                      "if os.environ['RANK'] == '1':\n    sys.argv += os.environ['RANK1_EXTRA'].split()\nmain()\n")
    base = [*TORCHRUN, str(script), "sweep", *DATA, *cache, "--head", "knn", "--combos", "singles", "--keep", "0"]
    for extra, said in [("--val-fraction 0.2", "the ranks disagree on the sweep"),
                        (f"--cache-dir {tmp_path / 'elsewhere'}", "rank 1 of 2: ")]:
        failed = _run([*base, "--runs-dir", str(tmp_path / "runs")], env={**ENV, "RANK1_EXTRA": extra})
        assert failed.returncode != 0
        errors = [line for line in failed.stderr.splitlines() if line.startswith("Error:")]
        assert errors and all(said in line for line in errors), failed.stderr[-2000:]
    assert not (tmp_path / "runs" / "sweeps").exists() or not any((tmp_path / "runs" / "sweeps").rglob("rows*"))


def test_a_two_rank_ranking_extracts_each_model_on_one_rank_and_writes_the_one_process_table(tmp_path):
    args = ["rank", *COMMON, "--backbone", "tiny", "--backbone", "tiny2", "--backbone",
            "tinywide", "--score", "logme,hscore", "--num-workers", "0"]
    single = _run([sys.executable, str(TESTS_DIR / "run_cli.py"), *args, "--cache-dir", str(tmp_path / "c1"),
                   "--runs-dir", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-3000:]
    multi = _run([*TORCHRUN, str(TESTS_DIR / "run_cli.py"), *args, "--cache-dir", str(tmp_path / "c2"), "--runs-dir",
                  str(tmp_path / "two")])
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert multi.stdout.count("ranking written to") == 1
    [one], [two] = ((tmp_path / name / "ranks").glob("*/table.csv") for name in ("one", "two"))
    assert one.parent.name == two.parent.name
    assert not list(two.parent.glob("rows.rank*"))
    pd.testing.assert_frame_equal(pd.read_csv(two).drop(columns="images_per_s"),
                                  pd.read_csv(one).drop(columns="images_per_s"))
    assert len(pd.read_csv(one)) == 9  # three taps of each of the three models
    assert sorted(p.name for p in (tmp_path / "c2" / "digits").glob("*.h5")) == \
        sorted(p.name for p in (tmp_path / "c1" / "digits").glob("*.h5"))  # each cache whole, on one rank


def test_a_two_rank_choice_decides_what_one_process_decides(tmp_path):
    from known import colour_folder

    data = colour_folder(tmp_path / "photos", seed=3)
    args = ["choose", "--data-dir", str(data), "--weights", "random", "--image-size", "24", "--device", "cpu",
            "--num-workers", "0", "-q", "--cv", "3", "--backbone", "known_halves", "--backbone", "known_fast"]
    timed = ("images_per_s", "probe_seconds", "test_accuracy")  # measured each run (test: refitted, to 1e-9 below)

    def answer(name, *launch):
        done = _run([*launch, str(TESTS_DIR / "run_cli.py"), *args, "--cache-dir", str(tmp_path / name / "cache"),
                     "--runs-dir", str(tmp_path / name / "runs")])
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("recommended: ") == 1
        [folder] = (tmp_path / name / "runs" / "choices").glob("[!.]*")
        return json.loads((folder / "answer.json").read_text()), pd.read_csv(folder / "candidates.csv")

    def decided(value):
        if isinstance(value, dict):
            return {k: decided(v) for k, v in value.items() if k not in timed and k not in ("screen", "request") and "folder" not in k
                    and "ranking" not in k}
        return [decided(v) for v in value] if isinstance(value, list) else value

    (one, one_table), (two, two_table) = answer("one", sys.executable), answer("two", *TORCHRUN)
    assert decided(two) == decided(one)
    assert abs(two["recommended"]["test_accuracy"] - one["recommended"]["test_accuracy"]) < 1e-9
    pd.testing.assert_frame_equal(two_table.drop(columns="images_per_s", errors="ignore"),
                                  one_table.drop(columns="images_per_s", errors="ignore"))


def test_a_rank_rows_file_that_is_a_link_is_neither_read_nor_folded(tmp_path):
    from featcache.torchrun import rank_files

    (tmp_path / "rows.rank0of2.jsonl").write_text("{}\n")
    (tmp_path / "rows.rank1of2.jsonl").symlink_to("/dev/zero")
    assert rank_files(tmp_path) == [tmp_path / "rows.rank0of2.jsonl"]


def test_a_rows_file_that_is_a_link_is_refused_in_one_line_and_its_target_left_alone(tmp_path):
    """A shared sweep or ranking folder whose rows.jsonl links elsewhere: resuming would read /dev/zero without end
    or append rows to the link's target; both refuse it instead."""
    from featcache.data.safe import UnsafeFile
    from featcache.ranking.run import read_rows as ranking_rows
    from featcache.sweeping.tables import finished

    outside = tmp_path / "outside.txt"
    outside.write_text("mine\n")
    for target in (outside, "/dev/zero"):
        folder = tmp_path / f"folder-{len(str(target))}"
        folder.mkdir()
        (folder / "rows.jsonl").symlink_to(target)
        for read in (finished, ranking_rows):
            with pytest.raises(UnsafeFile, match="it is a link, which featcache never writes there"):
                read(folder)
    assert outside.read_text() == "mine\n"
