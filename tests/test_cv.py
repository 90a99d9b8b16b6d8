"""``--cv K``: stratified K-fold cross-validation chooses the hyper-parameters (fuse-train) and ranks the
combinations (sweep) instead of one validation split, on small data; the test split is never read to choose."""

import json

import numpy as np
import pytest

from featcache.data.preprocess import PreprocessConfig
from featcache.data.source import DataRequest
from featcache.errors import FeatcacheError
from featcache.extraction.config import ExtractConfig
from featcache.fuse.evaluate import cv_folds, small_validation


def _features(tmp_path, **kw):
    return ExtractConfig(data=DataRequest(name="digits", limit_train=150, limit_test=60, **kw), backbones=("tiny",),
                         weights="random", preprocess=PreprocessConfig(image_size=32), device="cpu",
                         cache_dir=tmp_path / "cache")


def test_folds_are_stratified_and_validate_every_training_row_once():
    labels = np.repeat(np.arange(4), [10, 12, 9, 15])
    folds = cv_folds(labels, 3, seed=0)
    held = np.concatenate([val for _, val in folds])
    assert sorted(held) == list(range(len(labels)))  # each row once
    for fit, val in folds:
        assert not set(fit) & set(val) and len(fit) + len(val) == len(labels)
        assert all(abs(np.sum(labels[val] == c) - np.sum(labels == c) / 3) < 1 for c in range(4))
    assert [v.tolist() for _, v in cv_folds(labels, 3, seed=0)] == [v.tolist() for _, v in folds]
    assert [v.tolist() for _, v in cv_folds(labels, 3, seed=1)] != [v.tolist() for _, v in folds]
    with pytest.raises(FeatcacheError, match=r"--cv 10 needs at least 10 training images of every class .* the "
                                             r"smallest class has 9: use --cv 9 or fewer"):
        cv_folds(labels, 10, seed=0)


def test_a_small_validation_split_says_what_would_do_with_the_arithmetic():
    train = np.repeat(np.arange(4), 36)  # 144 training images, 36 of each class
    note = small_validation(train[::10], train)
    assert "20 per class would take --val-fraction 0.56 of the 36 training images of the rarest class, leaving too " \
           "few to train on" in note and "--cv 5 validates on every training image instead" in note
    assert small_validation(np.repeat(np.arange(4), 20), train) is None
    assert "cross-validated over 5 folds, every choice still rests on 8 images" in small_validation(
        np.repeat(np.arange(4), 8), cv=5)


def test_fuse_train_cv_chooses_as_scikit_learns_grid_search_and_fits_on_every_training_row(tmp_path):
    """The folds' mean accuracies are GridSearchCV's on the same folds (a scaler fitted on each fold's own rows),
    the chosen C its best_params_, and the run's head is fitted on all 150 training rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featcache.fuse.caches import load_features, locate_caches
    from featcache.fuse.fusion import TapRef
    from featcache.fuse.heads import HeadOptions
    from featcache.fuse.train import FuseTrainConfig, fuse_train
    from featcache.runs.records import load_record

    features = _features(tmp_path)
    Cs = (0.001, 0.01, 0.1, 1.0)
    said = []
    [run] = fuse_train(FuseTrainConfig(features=features, taps=("late",), heads=("logreg",), cv=3, run_extract=True,
                                       options=HeadOptions(grid={"C": Cs}), runs_dir=tmp_path / "runs"), log=said.append)
    record = load_record(run)
    data = load_features(locate_caches(features), {TapRef("tiny", "stage3")})
    X, y = data.taps[("train", TapRef("tiny", "stage3"))].astype(np.float64), data.labels["train"]
    search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0)),
                          {"logisticregression__C": list(Cs)}, cv=StratifiedKFold(3, shuffle=True, random_state=0))
    search.fit(X, y)
    ours = [c["val_accuracy"] for c in record.selection["candidates"]]
    assert ours == pytest.approx(search.cv_results_["mean_test_score"], abs=1e-9)
    assert all(len(c["fold_accuracies"]) == 3 for c in record.selection["candidates"])
    assert record.selection["params"] == {"C": search.best_params_["logisticregression__C"]}
    assert record.rows == {"train": 150, "val": 150, "test": 60, "cv": 3}
    assert record.metrics["accuracy"] == pytest.approx(search.score(data.taps[("test", TapRef("tiny", "stage3"))], data.labels["test"]), abs=1 / 60 + 1e-9)
    assert any("cross-validated over 3 folds" in line for line in said)


def test_a_cv_sweep_ranks_on_the_mean_over_folds_and_keeps_a_run_fitted_on_every_row(tmp_path):
    from featcache.runs.records import load_record
    from featcache.sweeping.config import SweepConfig
    from featcache.sweeping.run import sweep_and_keep
    from featcache.sweeping.tables import read_rows

    said = []
    cfg = SweepConfig(features=_features(tmp_path), combos="singles", heads=("logreg", "knn"), cv=3, keep=1,
                      run_extract=True, runs_dir=tmp_path / "runs")
    folder, count, [kept] = sweep_and_keep(cfg, log=said.append)
    rows = read_rows(folder)
    assert count == len(rows) == 3 * 3 * 2 and sorted({r["fold"] for r in rows}) == [0, 1, 2]
    import pandas as pd

    table = pd.read_csv(folder / "table.csv")
    assert (table["folds"] == 3).all() and list(table["val_acc"]) == sorted(table["val_acc"], reverse=True)
    for row in table.itertuples():  # chosen on the mean over the folds, each fold's test figure at that choice
        mine = [r for r in rows if "+".join(r["taps"]) == row.taps and r["head"] == row.head]
        means = {json.dumps(p, sort_keys=True): np.mean([dict((json.dumps(q, sort_keys=True), v) for q, v, _, _ in
                                                             r["candidates"])[json.dumps(p, sort_keys=True)]
                                                        for r in mine]) for p, *_ in mine[0]["candidates"]}
        assert row.chosen == max(means, key=means.get) and row.val_acc == pytest.approx(max(means.values()))
        tests = [next(t for p, _, t, _ in r["candidates"] if json.dumps(p, sort_keys=True) == row.chosen) for r in mine]
        assert row.test_acc == pytest.approx(np.mean(tests))
    assert any(line.startswith("    cv   ±95%") for line in said)
    record = load_record(kept)
    assert record.rows["cv"] == 3 and record.rows["train"] == 150
    assert json.loads(table.iloc[0]["chosen"]) == {k: v for k, v in record.selection["params"].items() if k == "C"}
    from featcache.reporting.page import ReportConfig, write_report

    page = write_report(ReportConfig(runs_dir=tmp_path / "runs", out=tmp_path / "r.html", gradcam_images=0,
                                     grid_images=0), log=lambda m: None).read_text()
    assert "chosen on validation (the mean over 3 cross-validation folds)" in page
    top = page.split("Top combinations", 1)[1].split("</table>", 1)[0]
    assert "–" not in top  # three folds: an interval, not a dash
        # a sweep with another --cv is another request: its own folder
    other = sweep_and_keep(SweepConfig(**{**vars(cfg), "cv": 2, "keep": 0}), log=lambda m: None)[0]
    assert other != folder


@pytest.mark.parametrize(("kw", "message"), [
    ({"cv": 1}, r"--cv must be 0 \(a validation split\) or a number of folds of 2 or more. Got 1 instead."),
    ({"cv": 3, "out_of_core": True, "heads": ("linear",)}, r"--cv fits every candidate on each fold in memory"),
    ({"cv": 3, "taps": ("auto",)}, r"--taps auto chooses taps on one validation split; with --cv"),
])
def test_bad_cv_requests_are_one_line(tmp_path, kw, message):
    from featcache.fuse.train import FuseTrainConfig

    with pytest.raises(FeatcacheError, match=message):
        FuseTrainConfig(features=_features(tmp_path), **kw)


def test_the_sweeps_macro_f1_is_scikit_learns():
    from sklearn.metrics import f1_score

    from featcache.sweeping.probes import macro_f1

    rng = np.random.default_rng(0)
    for k, n in ((2, 5), (5, 40), (10, 300)):
        truth, predicted = rng.integers(0, k, n), rng.integers(0, k - 1, n)  # the last class never predicted
        assert macro_f1(truth, predicted, k + 1) == pytest.approx(
            f1_score(truth, predicted, average="macro", labels=np.arange(k + 1), zero_division=0), abs=1e-12)


def test_the_warning_says_when_no_validation_fraction_can_hold_twenty_per_class():
    train = np.repeat(np.arange(3), 12)
    note = small_validation(train[::6], train)
    assert "20 per class would take more than all 12 training images of the rarest class; --cv 5" in note
    assert "would take all 20 training" in small_validation(train[::6], np.repeat(np.arange(3), 20))
