"""fuse-train end to end on digits with the tiny backbone and random weights (fast)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_config

from featcache.cli.commands import cli
from featcache.data.datasets import DataRequest
from featcache.errors import FeatcacheError
from featcache.extraction.reader import FeatureCache
from featcache.extraction.run import extract
from featcache.fuse import train as fusetrain
from featcache.fuse.heads import HeadOptions
from featcache.fuse.saved import load_head
from featcache.fuse.train import FuseTrainConfig, fuse_train, locate_caches
from featcache.runs.comparison import COLUMNS, runs_table
from featcache.runs.records import load_record

DATA = DataRequest(name="digits", limit_train=400, limit_test=150)
OPTIONS = HeadOptions(hidden=(32,), epochs=15, batch_size=64, patience=3)


def train_cfg(tmp_path, **kw):
    features = tiny_config(tmp_path, data=DATA, backbones=kw.pop("backbones", ("tiny",)))
    settings = dict(features=features, taps=("late",), heads=("logreg",), options=OPTIONS, runs_dir=tmp_path / "runs")
    settings.update(kw)
    return FuseTrainConfig(**settings)


@pytest.fixture
def cached(tmp_path):
    extract(tiny_config(tmp_path, data=DATA), progress=False)
    return tmp_path


def test_every_taps_head_combination_from_one_load(cached, monkeypatch):
    loads = []
    real = fusetrain.load_features
    monkeypatch.setattr(fusetrain, "load_features", lambda *a: loads.append(a) or real(*a))
    cfg = train_cfg(cached, taps=("late", "early,late"), heads=("logreg", "mlp"))
    runs = fuse_train(cfg, log=lambda m: None)
    assert len(runs) == 4 and len(loads) == 1
    table = runs_table(cached / "runs")
    assert sorted(zip(table.taps, table["head"])) == sorted(
        [("tiny:stage3", "logreg"), ("tiny:stage3", "mlp"), ("tiny:stage1+tiny:stage3", "logreg"),
         ("tiny:stage1+tiny:stage3", "mlp")])
    record = load_record(runs[1])
    assert record["dim"] == 16 and record["rows"] == {"train": 360, "val": 40, "test": 150}
    assert record["caches"]["tiny"]["fingerprint"]["backbone"] == "tiny"
    assert len(record["curves"]["val_acc"]) >= 1 and record["selection"]["best_epoch"] >= 1
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "top5_accuracy", "per_class", "confusion_matrix"):
        assert key in record["metrics"]
    assert np.sum(record["metrics"]["confusion_matrix"]) == 150
    assert {"torch", "scikit-learn", "featcache"} <= set(record["versions"])
    assert record["metrics"]["accuracy"] > 0.5  # random tiny features still carry the digits


def test_choices_never_see_the_test_labels(cached, monkeypatch):
    """Permuting the test labels changes the test score and nothing that was chosen."""
    cfg = train_cfg(cached, heads=("logreg", "mlp"), force=True)
    honest = [load_record(r) for r in fuse_train(cfg, log=lambda m: None)]
    real = fusetrain.load_features

    def permuted(*args):
        data = real(*args)
        data.labels["test"] = np.random.default_rng(0).permutation(data.labels["test"])
        return data

    monkeypatch.setattr(fusetrain, "load_features", permuted)
    shuffled = [load_record(r) for r in fuse_train(cfg, log=lambda m: None)]
    for a, b in zip(honest, shuffled):
        assert a["selection"] == b["selection"]
        assert a["curves"] == b["curves"]
        assert a["metrics"]["accuracy"] != b["metrics"]["accuracy"]


def test_same_seed_same_numbers(cached):
    cfg = train_cfg(cached, heads=("mlp",), force=True)
    a, b = (load_record(fuse_train(cfg, log=lambda m: None)[0]) for _ in range(2))
    assert a["metrics"]["accuracy"] == b["metrics"]["accuracy"] and a["curves"] == b["curves"]


def test_an_identical_request_is_served_from_its_run_unless_forced(cached, monkeypatch):
    cfg = train_cfg(cached, taps=("late", "early,late"), heads=("logreg",))
    first = fuse_train(cfg, log=lambda m: None)
    loads, lines = [], []
    real = fusetrain.load_features
    monkeypatch.setattr(fusetrain, "load_features", lambda *a: loads.append(a) or real(*a))
    # one new combination (the mlp) is trained; the two logreg runs are served without loading their taps
    again = fuse_train(train_cfg(cached, taps=("late", "early,late"), heads=("logreg", "mlp")), log=lines.append)
    assert again[0] == first[0] and again[2] == first[1] and again[1] not in first
    assert len(loads) == 1 and {r.tap for r in loads[0][1]} == {"stage1", "stage3"}
    assert sum("identical request: served from this run; --force trains again" in line for line in lines) == 2
    assert fuse_train(cfg, log=lambda m: None) == first
    forced = fuse_train(train_cfg(cached, taps=("late",), force=True), log=lambda m: None)
    changed = fuse_train(train_cfg(cached, taps=("late",), val_fraction=0.2), log=lambda m: None)
    assert len({first[0], forced[0], changed[0]}) == 3 and len(list((cached / "runs").glob("[!.]*"))) == 6


def _set_tap(cached, tap, values):
    import h5py

    path = locate_caches(train_cfg(cached).features)["tiny"]
    with h5py.File(path, "r+") as f:
        data = f["train"]["taps"][tap]
        data[...] = values(data.shape).astype(data.dtype)
    return path


def test_dead_taps_are_refused_by_name_unless_allowed(cached):
    path = _set_tap(cached, "stage3", np.zeros)  # as a ReLU block stored as all zeros
    rng = np.random.default_rng(0)
    _set_tap(cached, "stage1", lambda shape: rng.uniform(0, 2e-5, shape))  # entirely below float16's normal range
    with pytest.raises(FeatcacheError, match=r"tap tiny:stage3 is dead in .*: constant over every training image "
                                             r"\(all 0\)\. .*--dtype float32.*--allow-dead-taps"):
        fuse_train(train_cfg(cached), log=lambda m: None)
    with pytest.raises(FeatcacheError, match=r"tap tiny:stage1 is dead .*: 100% of its nonzero values lie below "
                                             r"float16's normal range"):
        fuse_train(train_cfg(cached, taps=("early",)), log=lambda m: None)
    lines = []
    [run] = fuse_train(train_cfg(cached, allow_dead_taps=True), log=lines.append)
    assert any("warning: tap tiny:stage3 is dead" in line for line in lines)
    fuse_train(train_cfg(cached, taps=("mid",)), log=lambda m: None)  # the healthy tap trains
    shown = CliRunner().invoke(cli, ["info", str(path)]).output
    assert "stage3         400 x 16       DEAD: constant" in shown and "stage2         400 x 12\n" in shown
    assert json.loads(CliRunner().invoke(cli, ["info", "--json", str(path)]).output)["dead_taps"].keys() == {
        "stage1", "stage3"}
    # --taps auto on the command line (it went around the selection once): the dead taps leave the candidates
    flags = ["--backbone", "tiny", "--weights", "random", "--image-size", "32", "--device", "cpu", "--limit-train",
             "400", "--limit-test", "150", "--cache-dir", str(cached / "cache"), "--runs-dir", str(cached / "auto")]
    result = CliRunner().invoke(cli, ["fuse-train", *flags, "--taps", "auto", "--head", "logreg"])
    assert result.exit_code == 0, result.output
    assert "note: tap tiny:stage1 is dead" in result.output and "note: tap tiny:stage3 is dead" in result.output
    [run] = (cached / "auto").glob("[!.]*")
    assert load_record(run).taps == ["tiny:stage2"] and "--taps auto chose tiny:stage2" in result.output


def test_tap_health_is_the_same_read_whole_or_in_chunks(monkeypatch):
    from featcache.extraction.reader import TapHealth

    rng = np.random.default_rng(1)
    tiny = rng.uniform(0, 3e-5, (50, 4)).astype(np.float16)
    tiny[:, 0] = 1.0  # a quarter of the values are normal: 75% below the range, still dead
    assert TapHealth(True).update(tiny).dead().startswith("75% of its nonzero values")
    chunked = TapHealth(True)
    for start in range(0, 50, 7):
        chunked.update(tiny[start:start + 7])
    assert chunked.dead() == TapHealth(True).update(tiny).dead()
    assert TapHealth(False).update(tiny).dead() is None  # float32 keeps small values
    constant = np.tile(rng.normal(size=(1, 3)), (10, 1))  # constant per column, different across columns
    assert TapHealth(False).update(constant).dead().startswith("constant over every training image")
    assert TapHealth(False).update(constant[:1]).dead() is None and TapHealth(True).update(rng.normal(size=(9, 3))).dead() is None


def test_choices_validation_could_not_make_well_are_warned_and_recorded(cached):
    lines = []
    cfg = train_cfg(cached, heads=("logreg", "mlp"), options=HeadOptions(hidden=(32,), epochs=2, batch_size=64,
                                                                          grid={"C": (1e-4, 1e-3)}))
    logreg, mlp = (load_record(r) for r in fuse_train(cfg, log=lines.append))
    warned = [line for line in lines if line.startswith("warning: ")]
    # 40 validation images of 10 classes; C at the top of its grid; the mlp still improving at its last epoch
    assert warned[0].startswith("warning: the validation split holds 40 images (4 of the rarest class; under 20 per class)")
    assert "logreg chose C=0.001, the largest of its grid (0.0001, 0.001): the best may lie beyond; widen it, e.g. "\
           "--C 0.0001,0.001,0.01,0.1" in warned[1]
    assert "mlp kept its last epoch (2): the validation loss was still falling" in warned[2] and len(warned) == 3
    assert len(logreg.warnings) == 2 and len(mlp.warnings) == 2 and "validation split" in mlp.warnings[0]


def test_fusion_across_backbones(tmp_path):
    cfg = train_cfg(tmp_path, backbones=("tiny", "resnet18"), run_extract=True, taps=("late",))
    [run] = fuse_train(cfg, log=lambda m: None)
    record = load_record(run)
    assert record["taps"] == ["tiny:stage3", "resnet18:layer4"] and record["dim"] == 16 + 512


def test_missing_cache_names_the_extract_command(tmp_path):
    with pytest.raises(FeatcacheError, match=r"no cached features for tiny in .* run featcache extract "
                                             r"--backbone tiny --dataset digits --limit-train 400 --limit-test 150 "
                                             r"--weights random .*--image-size 32 \(or add --extract\)"):
        fuse_train(train_cfg(tmp_path), log=lambda m: None)


def test_saved_heads_reload_with_the_same_predictions(cached):
    for head, files in (("logreg", {"head.skops"}), ("svm", {"head.skops"}), ("mlp", {"head.safetensors", "head.json"})):
        [run] = fuse_train(train_cfg(cached, heads=(head,)), log=lambda m: None)
        normalizer, model = load_head(run)
        X = normalizer.transform([np.ones((3, 16), np.float32)])
        assert model.predict_proba(X).shape == (3, 10)
        # no pickles in a new run folder: safetensors, JSON and skops only (issue 16)
        assert {p.name for p in run.iterdir()} == {"record.json", "normalizer.safetensors", *files}
        with FeatureCache(locate_caches(train_cfg(cached).features)["tiny"]) as cache:
            X_test = normalizer.transform([cache.read("test", "stage3")])
        assert list(model.predict(X_test)) == load_record(run).metrics["predictions"]


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


FLAGS = ["--backbone", "tiny", "--weights", "random", "--image-size", "32", "--device", "cpu",
         "--limit-train", "400", "--limit-test", "150"]


def test_cli_fuse_train_runs_and_csv(cached):
    runs_dir = cached / "runs"
    result = run_cli("fuse-train", *FLAGS, "--cache-dir", cached / "cache", "--runs-dir", runs_dir,
                     "--taps", "late", "--taps", "early,late", "--head", "logreg,linear", "--epochs", "5")
    assert result.exit_code == 0, result.output
    assert result.output.count("val acc") == 4
    table = run_cli("runs", "--runs-dir", runs_dir, "--csv", cached / "runs.csv", "--width", 100)
    assert table.exit_code == 0
    lines = table.output.splitlines()
    assert lines[0].split() == ["run", "chosen", "val", "acc", "test", "acc", "macro-F1", "fit", "s", "warn", "run",
                                "folder"]
    assert max(map(len, lines)) <= 100 and "tiny · stage1+stage3 · linear" in table.output and "C=" in table.output
    with open(cached / "runs.csv") as f:
        assert f.readline().strip().split(",") == COLUMNS and len(f.readlines()) == 4  # every column in the CSV
    by_test = run_cli("runs", "--runs-dir", runs_dir, "--sort", "test_acc", "--columns", "label,test_acc,variant")
    rows = by_test.output.splitlines()
    assert rows[0].split() == ["run", "test", "acc", "variant"] and len(rows) == 5 and "frozen" in rows[1]
    scores = [float(r.split()[-2]) for r in rows[1:]]
    assert scores == sorted(scores, reverse=True)
    bad = run_cli("runs", "--runs-dir", runs_dir, "--sort", "test_accuracy")
    assert bad.exit_code == 2 and "did you mean 'test_acc'" in bad.output


@pytest.mark.parametrize("args, pattern", [
    (["--taps", "lat"], "Got 'lat' instead; did you mean 'late'"),
    (["--head", "mlpp"], "did you mean 'mlp'"),
    (["--tap-norm", "zscore"], "'--tap-norm' option must be one of"),
    (["--hidden", "big"], "Invalid value for '--hidden': 'big' is not comma-separated whole numbers"),
    (["--val-fraction", "1.5"], "--val-fraction must lie between 0 and 1"),
])
def test_cli_bad_input_is_one_line_and_exit_2(cached, args, pattern):
    result = run_cli("fuse-train", *FLAGS, "--cache-dir", cached / "cache", "--runs-dir", cached / "runs", *args)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert pattern in result.output


def test_taps_missing_from_the_cache(cached):
    import h5py

    [path] = (cached / "cache" / "digits").glob("tiny-*.h5")
    with h5py.File(path, "r+") as f:
        del f["train/taps/stage3"]
    result = run_cli("fuse-train", *FLAGS, "--cache-dir", cached / "cache", "--runs-dir", cached / "runs")
    assert result.exit_code == 2 and "tap tiny:stage3 is not in" in result.output


def test_predict_on_files_matches_the_cached_evaluation(tmp_path, image_folder):
    data = ["--dataset", "folder", "--data-dir", image_folder, "--backbone", "tiny", "--weights", "random",
            "--image-size", "32", "--device", "cpu", "--cache-dir", tmp_path / "cache"]
    assert run_cli("extract", *data, "-q", "--num-workers", "0").exit_code == 0
    trained = run_cli("fuse-train", *data, "--runs-dir", tmp_path / "runs", "--head", "logreg", "--val-fraction", "0.25")
    assert trained.exit_code == 0, trained.output
    [run] = (tmp_path / "runs").glob("[!.]*")
    files = sorted(image_folder.rglob("*.png"))
    result = run_cli("predict", "--run", run.name, "--runs-dir", tmp_path / "runs", "--device", "cpu", *files)
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.output.strip().splitlines()]
    assert [line[0] for line in lines] == [str(f) for f in files]
    assert {line[1] for line in lines} <= {"cat", "dog"}
    correct = sum(line[1] == f.parent.name for line, f in zip(lines, files))
    assert correct >= 10  # the two generated classes differ in colour
    record = json.loads((run / "record.json").read_text())
    assert record["classes"] == ["cat", "dog"]
    # a folder (recursively) and a quoted glob name the same images; a missing path says so
    folder = run_cli("predict", "--run", run.name, "--runs-dir", tmp_path / "runs", "--device", "cpu", image_folder)
    pattern = run_cli("predict", "--run", run.name, "--runs-dir", tmp_path / "runs", "--device", "cpu",
                      str(image_folder / "*" / "*.png"))
    assert folder.output == pattern.output == result.output
    missing = run_cli("predict", "--run", run.name, "--runs-dir", tmp_path / "runs", str(tmp_path / "nope.jpg"))
    assert missing.exit_code == 2 and f"no image at {tmp_path / 'nope.jpg'}: check the path" in missing.output
    # --top-k and --output: the K best labels with probabilities, on screen and as a table
    table = tmp_path / "p.csv"
    top = run_cli("predict", "--run", run.name, "--runs-dir", tmp_path / "runs", "--device", "cpu", "--top-k", "2",
                  "--output", table, *files)
    assert top.exit_code == 0, top.output
    ranked = [line.split("\t") for line in top.stdout.strip().splitlines()]
    assert [r[:2] for r in ranked] == [line[:2] for line in lines]  # the best label first, as without --top-k
    assert all({r[1], r[3]} == {"cat", "dog"} and float(r[2]) >= float(r[4]) for r in ranked)
    written = list(csv.DictReader(table.open()))
    assert len(written) == 2 * len(files) and written[0]["rank"] == "1" and written[1]["rank"] == "2"
    assert abs(float(written[0]["probability"]) + float(written[1]["probability"]) - 1) < 1e-6
    bad = run_cli("predict", "--run", run.name, "--runs-dir", tmp_path / "runs", "--output", tmp_path / "p.txt",
                  *files)
    assert bad.exit_code == 2 and "--output " in bad.output and "written as .csv or .parquet" in bad.output
    # --output replaces its own predictions, never a user's file (a manifest given as the images) without --force
    again = run_cli("predict", "--run", run.name, "--runs-dir", tmp_path / "runs", "--device", "cpu", "--output",
                    table, *files[:2])
    assert again.exit_code == 0 and len(list(csv.DictReader(table.open()))) == 2
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\n" + "".join(f"{f},{f.parent.name}\n" for f in files))
    kept = manifest.read_text()
    base = ["predict", "--run", run.name, "--runs-dir", tmp_path / "runs", "--device", "cpu", manifest]
    refused = run_cli(*base, "--output", manifest)
    assert refused.exit_code == 2 and "is not a predictions table featcache wrote" in refused.output
    assert manifest.read_text() == kept
    for where, message in ((tmp_path / "runs", "is a folder: give a file name"),
                           (manifest / "p.csv", "is a file, so nothing can be written below it"),
                           (Path("/proc/p.csv"), "cannot write --output /proc/p.csv")):
        result = run_cli(*base, "--output", where)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    forced = run_cli(*base, "--output", manifest, "--force")
    assert forced.exit_code == 0 and manifest.read_text().startswith("file,rank,label,probability")


def test_predict_errors(tmp_path):
    result = run_cli("predict", "--run", tmp_path, str(tmp_path / "x.png"))
    assert result.exit_code == 2 and "is not a run folder" in result.output


def test_bad_tap_names_fail_before_looking_for_or_making_a_cache(tmp_path, monkeypatch):
    import featcache.fuse.train

    monkeypatch.setattr(featcache.fuse.train, "extract", lambda *a, **k: pytest.fail("extraction ran"))
    with pytest.raises(FeatcacheError, match="Got 'erly' instead; did you mean 'early'"):
        fuse_train(train_cfg(tmp_path, taps=("erly",), run_extract=True), log=lambda m: None)
