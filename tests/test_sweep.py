"""The sweep: solvers against scikit-learn, k-NN against brute force, a small sweep end to end, resume, bad input."""

import csv
import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from featcache.data.datasets import DataRequest
from featcache.data.preprocess import PreprocessConfig
from featcache.errors import FeatcacheError
from featcache.extraction.config import ExtractConfig
from featcache.sweeping.config import SweepConfig, combinations
from featcache.sweeping.knn import neighbours, vote
from featcache.sweeping.run import sweep
from featcache.solvers.path import objective_value, scores_of, solve_path


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    return X[:1200], y[:1200], X[1200:], y[1200:]


def _reaches_scikit_learn(X, y, X_test, y_test, Cs, solutions, loss):
    for C, W in zip(Cs, solutions):
        ref = (LogisticRegression(C=C, max_iter=5000, tol=1e-8) if loss == "logreg"
               else LinearSVC(C=C, max_iter=50000, tol=1e-8)).fit(X, y)
        ours = objective_value(X, y, W.numpy(), C, loss)
        theirs = objective_value(X, y, np.vstack([ref.coef_.T, ref.intercept_]), C, loss)
        assert abs(ours - theirs) / theirs < 1e-4, (C, ours, theirs)
        predicted = scores_of(torch.tensor(X_test), W).argmax(1).numpy()
        assert abs(int((predicted == y_test).sum()) - int((ref.predict(X_test) == y_test).sum())) <= 1


def test_the_svm_path_reaches_scikit_learns_solution(digits):
    X, y, X_test, y_test = digits
    Cs = [0.01, 1.0]
    _reaches_scikit_learn(X, y, X_test, y_test, Cs, solve_path(torch.tensor(X), torch.tensor(y), Cs, "svm", 10), "svm")


@pytest.mark.parametrize("batch_bytes", [1 << 30, 1])  # every problem in one batch, or one batch each
@pytest.mark.parametrize("rows", [1200, 40])  # more rows than features, or fewer: through the rows' Gram matrix
def test_logistic_regressions_solved_together_reach_scikit_learns_solutions(digits, monkeypatch, batch_bytes, rows):
    """Problems of different widths, sharing blocks, every C at once: each reaches LogisticRegression's objective."""
    from featcache.solvers import lanes

    monkeypatch.setattr(lanes, "BATCH_BYTES", batch_bytes)
    X, y, X_test, y_test = digits
    X, y = X[:rows], y[:rows]
    Cs = [0.01, 0.1, 1.0]  # at C = 10 the default tolerance stops up to 5e-4 above the objective's minimum
    blocks = {"left": slice(0, 40), "right": slice(40, 64)}
    tensors = {name: torch.tensor(X[:, cut]) for name, cut in blocks.items()}
    problems = [["left"], ["right"], ["left", "right"]]
    solved = lanes.solve_many([[tensors[b] for b in p] for p in problems], torch.tensor(y), Cs, 10)
    assert [len(s) for s in solved] == [len(Cs)] * len(problems)
    for names, solutions in zip(problems, solved):
        columns = np.r_[tuple(blocks[b] for b in names)]
        _reaches_scikit_learn(X[:, columns], y, X_test[:, columns], y_test, Cs, solutions, "logreg")


def test_fuse_trains_logreg_is_the_sweeps_solver_as_scikit_learns_model(digits):
    """fuse-train's logreg: every C solved together by the sweep's L-BFGS, each an ordinary LogisticRegression at
    scikit-learn's optimum (the kept run of a sweep then holds the weights its row scored)."""
    from featcache.fuse.evaluate import fit_select
    from featcache.fuse.heads import HEADS
    from featcache.fuse.options import HeadOptions

    X, y, X_test, y_test = (a.astype(np.float32) if a.dtype.kind == "f" else a for a in digits)
    Cs = (0.01, 0.1, 1.0)
    selection = fit_select(HEADS.lookup("logreg"), HeadOptions(grid={"C": Cs}), X[:900], y[:900], X[900:], y[900:])
    assert [type(h) for h in selection.fitted] == [LogisticRegression] * 3 and [h.C for h in selection.fitted] == [*Cs]
    for C, head in zip(Cs, selection.fitted):
        _reaches_scikit_learn(X[:900].astype(np.float64), y[:900], X_test, y_test, [C],
                              [torch.tensor(np.vstack([head.coef_.T, head.intercept_]), dtype=torch.float32)], "logreg")
        assert np.allclose(head.predict_proba(X_test).sum(1), 1.0)  # scikit-learn's own methods read it
    two = fit_select(HEADS.lookup("logreg"), HeadOptions(grid={"C": (1.0,)}), X[:900], y[:900] % 2, X[900:],
                     y[900:] % 2)
    assert two.head.n_iter_[0] > 0  # two classes: scikit-learn's binary model fitted it (the softmax's penalty differs)


def test_fuse_trains_svm_is_linear_svc_solved_by_newton_and_saved_as_such(digits, tmp_path):
    """fuse-train's svm: LinearSVC's objective reached by the sweep's exact Newton steps (liblinear did not finish one
    C on CIFAR-shaped rows in 300 s), calibrated by scikit-learn as before, and read back from head.skops."""
    import skops.io

    from featcache.fuse.heads import HEADS
    from featcache.fuse.options import HeadOptions
    from featcache.fuse.saved import SKOPS_TRUSTED

    X, y, X_test, y_test = (a.astype(np.float32) if a.dtype.kind == "f" else a for a in digits)
    Cs = [0.01, 1.0]
    fitted = [HEADS.lookup("svm").make(HeadOptions(), C=C).fit(X, y) for C in Cs]
    _reaches_scikit_learn(X.astype(np.float64), y, X_test, y_test, Cs,
                          [torch.tensor(np.vstack([h.coef_.T, h.intercept_]), dtype=torch.float32) for h in fitted],
                          "svm")
    calibrated = HEADS.lookup("svm").final(HeadOptions(), C=0.1).fit(X, y)
    skops.io.dump(calibrated, tmp_path / "head.skops")
    again = skops.io.load(tmp_path / "head.skops", trusted=SKOPS_TRUSTED)
    assert np.array_equal(again.predict_proba(X_test), calibrated.predict_proba(X_test))
    assert HEADS.lookup("svm").make(HeadOptions(), C=1.0).fit(X, y % 2).n_iter_ > 0  # two classes: liblinear


def test_a_problem_solved_again_in_the_process_starts_at_its_solution(digits, monkeypatch):
    """A sweep's kept run fits its row again: the same columns (the sweep's two taps, the kept run's one fused matrix)
    and labels start at the kept solution, and L-BFGS stops at its first test; other labels start from zero."""
    from featcache.solvers import lanes

    X, y, _, _ = digits
    features, labels = torch.tensor(X[:600], dtype=torch.float32), torch.tensor(y[:600])
    evaluations = []
    evaluate = lanes._Logistic.evaluate
    monkeypatch.setattr(lanes._Logistic, "evaluate", lambda self, x: evaluations.append(1) or evaluate(self, x))
    [first] = lanes.solve_many([[features[:, :40], features[:, 40:]]], labels, [0.1, 1.0], 10)
    cold = len(evaluations)
    [again] = lanes.solve_many([[features.clone()]], labels, [0.1, 1.0], 10)
    assert len(evaluations) == cold + 1 and cold > 10
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    lanes.solve_many([[features]], (labels + 1) % 10, [0.1, 1.0], 10)
    assert len(evaluations) > cold + 10


def test_the_svm_reuses_the_rotation_of_the_logistic_regressions(digits):
    """40 rows of 64 features in two blocks: the svm on the rotation solve_many made equals the svm rotating itself."""
    from featcache.solvers import lanes

    X, y, _, _ = digits
    left, right, labels = torch.tensor(X[:40, :40]), torch.tensor(X[:40, 40:]), torch.tensor(y[:40])
    rotations = []
    lanes.solve_many([[left, right], [left]], labels, [1.0], 10, rotations=rotations)
    assert rotations[1] is None  # 40 rows, 40 columns: not through the rows' Gram matrix, nothing to keep
    fused = torch.cat([left, right], dim=1)
    ours = solve_path(fused, labels, [0.1, 1.0], "svm", 10, rotated=rotations[0])
    for W, ref in zip(ours, solve_path(fused, labels, [0.1, 1.0], "svm", 10)):
        assert torch.allclose(W, ref, atol=1e-8), (W - ref).abs().max()


def test_a_rotation_is_reused_for_the_same_numbers_only(digits):
    """A kept run refits its sweep row on a new tensor of the same numbers: the rotation is served again; one value
    changed anywhere makes it afresh."""
    from featcache.solvers.path import rotate

    X = torch.tensor(digits[0][:300], dtype=torch.float32)
    first = rotate(X)
    assert rotate(X.clone()) is first
    changed = X.clone()
    changed[123, 45] += 1.0
    again = rotate(changed)
    assert again is not first and not torch.equal(again[2], first[2])


def test_an_svm_solved_again_in_the_process_is_served_for_the_same_numbers_only(digits, monkeypatch):
    """A kept svm run fits its row's C on the same rows as the sweep's path: served from this process's solves; other
    labels or one changed value solve afresh."""
    from featcache.solvers import hinge, path

    X, y, _, _ = digits
    features, labels = torch.tensor(X[:500], dtype=torch.float32), torch.tensor(y[:500])
    calls = []
    newton = hinge.newton_features
    monkeypatch.setattr(hinge, "newton_features", lambda *a, **k: calls.append(1) or newton(*a, **k))
    path._SOLVED.clear()
    first = solve_path(features, labels, [0.01, 0.1], "svm", 10)
    solved = len(calls)
    [again] = solve_path(features.clone(), labels.clone(), [0.1], "svm", 10)
    assert len(calls) == solved and torch.equal(again, first[1])
    changed = features.clone()
    changed[7, 3] += 0.5
    solve_path(changed, labels, [0.1], "svm", 10)
    solve_path(features, (labels + 1) % 10, [0.1], "svm", 10)
    assert len(calls) == solved + 2


def test_knn_votes_match_a_brute_force_count(digits):
    X, y, X_test, _ = digits
    train, queries = torch.tensor(X[:300]), torch.tensor(X_test[:50])
    sims, idx = neighbours(train, queries, 10, block=7)  # blocks of 7 queries: the same as one block
    cos = (X_test[:50] / np.linalg.norm(X_test[:50], axis=1, keepdims=True)) @ (X[:300] / np.linalg.norm(X[:300], axis=1, keepdims=True)).T
    expected = np.argsort(-cos, axis=1)[:, :10]
    assert (idx.numpy() == expected).mean() > 0.99  # ties may swap places
    scores = vote(sims, idx, torch.tensor(y[:300]), 10, 10).numpy()
    manual = np.zeros((50, 10))
    for q in range(50):
        for j in idx[q].numpy():
            manual[q, y[j]] += np.exp(cos[q, j] / 0.07)
    assert np.allclose(scores, manual, rtol=1e-6)


def _cfg(tmp_path, **kw):
    features = ExtractConfig(data=DataRequest(name="digits", limit_train=300, limit_test=100), backbones=("tiny",),
                             weights="random", preprocess=PreprocessConfig(image_size=32), device="cpu",
                             cache_dir=tmp_path / "cache")
    base = dict(features=features, heads=("logreg", "svm", "knn"), runs_dir=tmp_path / "runs", keep=1, run_extract=True,
                val_fraction=0.2)
    return SweepConfig(**{**base, **kw})


def test_a_module_tap_through_a_norm_is_swept_paired_and_kept(tmp_path):
    """A --module NAME@NORM:POOLING tap's name holds no character the sweep's tables join taps with: it is paired,
    tabled and kept as a run of the same two taps."""
    from featcache.runs.records import load_record

    features = dataclasses.replace(_cfg(tmp_path).features, modules=("stage3.0@stage3.1:max",))
    folder = sweep(_cfg(tmp_path, features=features, heads=("logreg",), combos="0",
                        taps=("stage2,stage3.0@stage3.1",)), log=lambda m: None)
    [row] = list(csv.DictReader(io.StringIO((folder / "table.csv").read_text())))
    assert row["taps"] == "tiny:stage2+tiny:stage3.0@stage3.1"
    [run] = [p for p in (tmp_path / "runs").iterdir() if (p / "record.json").exists()]
    assert load_record(run).taps == ["tiny:stage2", "tiny:stage3.0@stage3.1"]


def test_a_sweep_writes_its_table_keeps_the_best_as_a_run_and_resumes(tmp_path):
    from featcache.runs.records import load_record, run_folders

    folder = sweep(_cfg(tmp_path, seeds=(0, 1), shots=(2,), repeats=2), log=lambda m: None)
    table = (folder / "table.csv").read_text().splitlines()
    assert len(table) == 1 + 6 * 3  # 3 taps + 3 pairs, 3 heads
    assert table[0].startswith("taps,head,n_taps,width,chosen,val_acc,val_acc_ci,test_acc,test_acc_ci,macro_f1,fit_s,seeds")
    rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 6 * 3 + 2 * 2 * 6 * 3  # seeds x combos x heads, and the few-shot draws
    assert all(r["chosen"] for r in rows) and {r["head"] for r in rows} == {"logreg", "svm", "knn"}
    assert (folder / "fewshot.csv").exists()
    assert json.loads((folder / "sweep.json").read_text())["taps"] == ["tiny:stage1", "tiny:stage2", "tiny:stage3"]
    [run] = run_folders(tmp_path / "runs")
    # the kept run is the first seed's replicate: that seed's choice, the svm linear as swept
    top = next(csv.DictReader(io.StringIO("\n".join(table))))
    first = next(r for r in rows
                 if (r["seed"], r["shots"], "+".join(r["taps"]), r["head"]) == (0, 0, top["taps"], top["head"]))
    record = load_record(run)
    params = dict(record.selection["params"])
    assert record.head == top["head"] in ("logreg", "svm") and params.pop("kernel", "linear") == "linear"
    assert params == first["chosen"] and len(record.selection["candidates"]) == 1
    # Interrupted after 10 evaluations: the re-run computes only the missing ones and ends with the same table.
    lines = (folder / "rows.jsonl").read_text().splitlines()
    (folder / "rows.jsonl").write_text("\n".join(lines[:10]) + "\n" + lines[10][:15])  # the last line cut short
    said = []
    sweep(_cfg(tmp_path, seeds=(0, 1), shots=(2,), repeats=2), log=said.append)
    assert f"{len(rows) - 10} evaluations in" in " ".join(said)
    assert (folder / "table.csv").read_text().splitlines()[0] == table[0]
    # the closing lines give each head's few-shot curve for its best combination on validation (the table's order)
    best = {}
    for line in csv.DictReader(io.StringIO("\n".join(table))):
        best.setdefault(line["head"], line["taps"])
    few = [line for line in said if line.startswith("  ") and " shots " in line]
    assert [line.split()[0] for line in few] == ["logreg", "svm", "knn"]
    assert all(line.endswith(f"  {best[line.split()[0]]}") and "2 shots 0." in line for line in few)
    # The report shows the sweep: depth curve, pair heatmap, few-shot curve, top and k-NN tables.
    from featcache.reporting.page import ReportConfig, write_report

    page = write_report(ReportConfig(runs_dir=tmp_path / "runs", out=tmp_path / "r.html", gradcam_images=0,
                                     grid_images=0), log=lambda m: None).read_text()
    assert f"sweeps/{folder.name}/table.csv" in page and "<h2 id=\"sweep-1\">Sweep: tiny on digits" in page
    for text in ('alt="Each tap alone', 'alt="Every pair of taps', 'alt="Few-shot', "Top combinations", "k-NN</caption>"):
        assert text in page, text


def test_the_reports_depth_lines_follow_network_order_not_the_ranking(tmp_path):
    """The table is ranked by validation; the depth plot and the pair heatmap read the taps in network order, from
    the sweep's own list (sweep.json), any tap it lacks after them."""
    import pandas as pd

    from featcache.reporting.sweeps import _bounded, depth_lines, network_order, sweep_request

    order = ["a:stem", "a:block2", "a:block10", "b:x1", "b:x2"]
    (tmp_path / "sweep.json").write_text(json.dumps({"taps": order[:-1]}))
    table = pd.DataFrame({"taps": ["a:block10", "b:x2", "a:stem", "b:x1", "a:block2"], "head": "logreg",
                          "test_acc": [0.9, 0.8, 0.5, 0.6, 0.7], "test_acc_ci": 0.3})  # ranked: best first
    assert network_order(sweep_request(tmp_path), table) == order
    lines = depth_lines(table, order)
    assert list(lines) == ["a · logreg", "b · logreg"]
    x, rows = lines["a · logreg"]
    assert x == [0, 0.5, 1] and list(rows["test_acc"]) == [0.5, 0.7, 0.9]  # relative depth: 3 taps of a
    assert _bounded([0.9, 0.1], [0.3, 0.3]).tolist() == [[0.3, 0.1], pytest.approx([0.1, 0.3])]  # within [0, 1]
    (tmp_path / "sweep.json").write_text("[1, 2]")  # not the sweep's: the table's own order
    assert network_order(sweep_request(tmp_path), table) == list(table["taps"])


@pytest.mark.parametrize(("choices", "most"), [((0.1, 0.001, 0.001), 0.001), ((0.1, 0.001), 0.1)])
def test_a_kept_run_is_the_first_seeds_choice_with_the_svm_as_swept(tmp_path, monkeypatch, choices, most):
    """The table shows each combination's most frequent choice over the seeds (ties: the first seed's); the run
    kept is the first seed's replicate (its own choice, its split) and the svm stays linear, as the sweep solved it."""
    from featcache.fuse import train
    from featcache.fuse.heads import HEADS
    from featcache.sweeping import run as sweep_run
    from featcache.sweeping.tables import read_rows, tables

    folder = tmp_path / "sweep"
    folder.mkdir()
    rows = [{"seed": seed, "taps": ["tiny:stage3"], "head": "svm", "shots": 0, "repeat": 0, "width": 8,
             "chosen": {"C": C}, "val_acc": 0.9, "test_acc": 0.8, "macro_f1": 0.8, "fit_s": 0.1}
            for seed, C in enumerate(choices)]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table, _, _ = tables(read_rows(folder))
    assert json.loads(table["chosen"][0]) == {"C": most}
    asked = []
    monkeypatch.setattr(train, "fuse_train", lambda cfg, log: asked.append(cfg) or [])
    sweep_run._keep(_cfg(tmp_path, seeds=tuple(range(len(choices)))), table, rows, log=lambda m: None)
    [cfg] = asked
    assert cfg.options.seed == 0 and cfg.options.grid == {"C": (0.1,), "kernel": ("linear",)}
    assert [c["kernel"] for c in HEADS["svm"].candidates(cfg.options, 100)] == ["linear"]  # no RBF on small data


def test_a_runs_folder_holding_only_a_sweep_gets_a_report_of_it(tmp_path):
    from featcache.reporting.page import ReportConfig, write_report

    sweep(_cfg(tmp_path, combos="singles", heads=("logreg",), keep=0), log=lambda m: None)
    page = write_report(ReportConfig(runs_dir=tmp_path / "runs", out=tmp_path / "r.html", gradcam_images=0),
                        log=lambda m: None).read_text()
    assert "Sweep: tiny on digits" in page and "0 runs" in page and 'id="comparison"' not in page
    assert "random</strong> (not pretrained) in this sweep" in page  # the sweep's weights, from its sweep.json


def test_a_narrower_request_on_the_same_folder_tables_only_its_own_evaluations(tmp_path):
    """rows.jsonl keeps every evaluation made with these caches and options (a wider request reuses them);
    table.csv and the ranking are the request's own."""
    wide = sweep(_cfg(tmp_path, heads=("logreg",), keep=0), log=lambda m: None)  # 3 taps and 3 pairs
    said = []
    narrow = sweep(_cfg(tmp_path, heads=("logreg",), keep=0, combos="0", taps=("early,late",)), log=said.append)
    assert narrow == wide and any("every evaluation of this sweep is in" in line for line in said)
    assert len((wide / "rows.jsonl").read_text().splitlines()) == 6
    table = list(csv.DictReader(io.StringIO((narrow / "table.csv").read_text())))
    assert [(row["taps"], row["head"]) for row in table] == [("tiny:stage1+tiny:stage3", "logreg")]


def test_a_single_seed_logreg_row_matches_fuse_train(tmp_path):
    from featcache.fuse.train import FuseTrainConfig, fuse_train
    from featcache.runs.records import load_record

    folder = sweep(_cfg(tmp_path, combos="singles", heads=("logreg",), keep=0), log=lambda m: None)
    rows = {r["taps"][0]: r for r in map(json.loads, (folder / "rows.jsonl").read_text().splitlines())}
    cfg = _cfg(tmp_path)
    [run] = fuse_train(FuseTrainConfig(features=cfg.features, taps=("late",), heads=("logreg",), val_fraction=0.2,
                                       runs_dir=tmp_path / "ft"), log=lambda m: None)
    record = load_record(run)
    row = rows["tiny:stage3"]
    assert [c["val_accuracy"] for c in record.selection["candidates"]] == pytest.approx([a for _, a in row["candidates"]])
    assert row["chosen"] == record.selection["params"]
    assert round(abs(row["test_acc"] - record.metrics["accuracy"]) * 100) <= 1  # of 100 test images: one at most


@pytest.mark.parametrize(("kw", "message"), [
    ({"heads": ("logreg", "rf")}, r"The '--head' option must be one of \{knn, linear, logreg, mlp, svm\}. Got 'rf'"),
    ({"combos": "3", "max_combos": 5}, r"--combos 3 over 3 taps makes 7 combinations, over --max-combos 5"),
    ({"combos": "many"}, r"--combos must be singles, pairs or a number of taps N \(0: only the --taps given\). Got many instead."),
    ({"taps": (" ",)}, r"--taps has an empty entry"),
    ({"shots": (200,)}, r"--shots 200 asks for more training images per class than the smallest class leaves"),
])
def test_bad_sweep_requests_are_one_line_and_write_nothing(tmp_path, kw, message):
    with pytest.raises(FeatcacheError, match=message):
        cfg = _cfg(tmp_path, **kw)
        if "shots" not in kw:
            combinations(cfg)
        sweep(cfg, log=lambda m: None)
    assert not (tmp_path / "runs").exists()


def test_the_python_api_returns_the_table(tmp_path, capsys):
    import featcache

    table = featcache.sweep(backbone="tiny", weights="random", image_size=32, limit_train=200, limit_test=60,
                            combos="singles", head="logreg,knn", keep=0, extract=True, device="cpu",
                            cache_dir=tmp_path / "cache", runs_dir=tmp_path / "runs")
    assert len(table) == 3 * 2 and set(table["head"]) == {"logreg", "knn"}
    assert list(table["val_acc"]) == sorted(table["val_acc"], reverse=True)
    assert (table.attrs["folder"] / "rows.jsonl").exists()
    said = capsys.readouterr()
    assert "sweep:   0%|          | 0/6 [" in said.err  # the evaluations' progress bar
    assert "6 evaluations in" in said.out
    assert "warning: the validation split holds 20 images" in said.out  # 200 rows, 10% to validation
    quiet = featcache.sweep(backbone="tiny", weights="random", image_size=32, limit_train=200, limit_test=60,
                            combos="singles", head=["logreg", "knn"], keep=0, device="cpu", cache_dir=tmp_path / "cache",
                            runs_dir=tmp_path / "quiet", quiet=True)  # evaluated afresh in another runs folder
    assert capsys.readouterr() == ("", "")  # quiet=True: no bar, no line
    assert len(quiet) == 6


def test_taps_auto_chooses_on_validation_and_records_the_path(tmp_path):
    import featcache
    from featcache.runs.records import load_record

    said = []
    import builtins

    real_print = builtins.print
    builtins.print = lambda *a, **k: said.append(" ".join(map(str, a)))
    try:
        [run] = featcache.fuse_train(backbone="tiny", weights="random", image_size=32, limit_train=300, limit_test=100,
                                     taps="auto", head="logreg", extract=True, device="cpu", val_fraction=0.2,
                                     cache_dir=tmp_path / "cache", runs_dir=tmp_path / "runs")
    finally:
        builtins.print = real_print
    record = load_record(run)
    path = record.config["tap_selection"]
    assert path and [step["taps"] for step in path][-1] == record.taps
    assert all(b["val_acc"] > a["val_acc"] for a, b in zip(path, path[1:]))  # each step raised validation accuracy
    assert any("--taps auto chose" in line for line in said)


@pytest.mark.parametrize("rows, form", [(40, "rows"), (100, "rows"), (40, "features")])
def test_the_svm_with_few_rows_reaches_linearsvc_in_either_newton_form(digits, monkeypatch, rows, form):
    from featcache.solvers import hinge_rows

    X, y, _, _ = digits  # 40 rows (rotated to 39 columns) or 100 rows of 64 features: the Woodbury form,
    X, y = X[:rows], y[:rows]  # or, where the rows' Gram matrix would not fit, every class on the rotated features
    if form == "features":
        monkeypatch.setattr(hinge_rows, "ROWS_PER_FEATURE", 0)
        monkeypatch.setattr(hinge_rows, "newton_rows", None)  # never reached
    for C, W in zip([0.1, 10.0], solve_path(torch.tensor(X), torch.tensor(y), [0.1, 10.0], "svm", 10)):
        ref = LinearSVC(C=C, max_iter=50000, tol=1e-10).fit(X, y)
        theirs = objective_value(X, y, np.vstack([ref.coef_.T, ref.intercept_]), C, "svm")
        assert abs(objective_value(X, y, W.numpy(), C, "svm") - theirs) / theirs < 1e-6


def test_the_svm_solved_for_every_c_at_once_reaches_linearsvc_as_one_c_at_a_time_does(digits):
    from featcache.solvers.hinge_rows import newton_rows, rows_form

    X, y, _, _ = digits  # 100 rows of 64 features: the rows' form, every (C, class) a lane (the GPU's way)
    X, y, Cs = X[:100], y[:100], [0.01, 0.1, 10.0]
    form = rows_form(torch.tensor(X))
    for C, W in zip(Cs, newton_rows(form, torch.tensor(y), Cs, 10)):
        ref = LinearSVC(C=C, max_iter=50000, tol=1e-10).fit(X, y)
        theirs = objective_value(X, y, np.vstack([ref.coef_.T, ref.intercept_]), C, "svm")
        assert abs(objective_value(X, y, W.numpy(), C, "svm") - theirs) / theirs < 1e-6


@pytest.mark.parametrize("entries", [None, 2 * 30**2])  # every lane's square at once, or two lanes at a time
def test_the_svm_newton_steps_of_many_lanes_through_the_margin_rows_or_the_rest_are_the_dense_ones(monkeypatch,
                                                                                                   entries):
    from featcache.solvers import hinge
    from featcache.solvers.hinge_rows import inverse_hessian_times, rows_form

    if entries:
        monkeypatch.setattr(hinge, "HESSIAN_ENTRIES", entries)

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(60, 45, generator=gen, dtype=torch.float64)
    # at most 30 rows in the margin: through them, else through the rest; 29, 28, 25 (and 31, 33, 35 at C = 3, their
    # rest) factorised together, padded
    sizes = [0, 12, 29, 31, 60, 5, 45, 28, 25, 33, 35]
    active = torch.zeros(60, len(sizes), dtype=torch.bool)
    for lane, size in enumerate(sizes):
        active[torch.randperm(60, generator=gen)[:size], lane] = True
    g = torch.randn(46, len(sizes), generator=gen, dtype=torch.float64)
    Cs, which = [0.01, 3.0], torch.tensor([0, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1])  # each lane's C
    form, factors = rows_form(X), {}
    Xb = form["Xb"]
    for _ in range(2):  # the second time on the factors kept from the first
        steps = inverse_hessian_times(form, Cs, which, active, g, factors)
        for lane in range(len(sizes)):
            A = Xb[active[:, lane]]
            H = torch.eye(46, dtype=torch.float64) + 2 * Cs[which[lane]] * A.T @ A
            assert torch.allclose(H @ steps[:, lane], g[:, lane], rtol=0, atol=1e-9 * g[:, lane].abs().max())
    assert sorted(factors) == [0, 1]


@pytest.mark.parametrize("block", [None, 10])  # the Gram matrices whole, or by blocks of 10 columns, the last short
def test_the_svm_newton_keeps_each_class_hessian_equal_to_its_margin_rows(digits, monkeypatch, block):
    from featcache.solvers import hinge
    from featcache.solvers.hinge import newton_features

    if block:
        monkeypatch.setattr(hinge, "GRAM_BLOCK", block)

    X, y, _, _ = digits  # 1,200 rows, 64 features: every class at once, Hessians carried from C to C
    X, y = torch.tensor(X), torch.tensor(y)
    W, state = newton_features(X, y, 0.01, 10)
    W, state = newton_features(X, y, 1.0, 10, init=W, state=state)  # updated by the rows that crossed
    Xb = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    for k in range(10):
        rows = Xb[state["active"][:, k]]
        assert torch.allclose(state["hessians"][k], rows.T @ rows, rtol=1e-9, atol=1e-8)


def test_the_svm_falls_back_to_lbfgs_where_newtons_hessians_would_not_fit(digits, monkeypatch):
    from featcache.solvers import hinge

    X, y, _, _ = digits
    monkeypatch.setattr(hinge, "HESSIAN_ENTRIES", 0)
    monkeypatch.setattr(hinge, "newton_features", None)  # never reached
    (W,) = solve_path(torch.tensor(X), torch.tensor(y), [0.01], "svm", 10)
    ref = LinearSVC(C=0.01, max_iter=50000, tol=1e-8).fit(X, y)
    theirs = objective_value(X, y, np.vstack([ref.coef_.T, ref.intercept_]), 0.01, "svm")
    assert abs(objective_value(X, y, W.numpy(), 0.01, "svm") - theirs) / theirs < 1e-4


def test_the_rotation_of_wide_features_is_exact_when_built_a_block_of_columns_at_a_time(monkeypatch):
    from featcache.solvers import path as solvers

    X = torch.randn(30, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    monkeypatch.setattr(solvers, "COLUMN_BLOCK", 7)  # 15 blocks, the last one short
    monkeypatch.setattr(solvers, "_ROTATED", None)
    Z, V, S = solvers.rotate(X)
    assert Z.shape == (30, 30) and V.shape == (100, 30)
    assert torch.allclose(Z @ V.T, X, atol=1e-10)
    assert torch.allclose(V.T @ V, torch.eye(30, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(Z.T @ Z, torch.diag(S**2), atol=1e-8)


def test_the_table_ranks_on_validation_alone_ties_to_the_narrower(tmp_path):
    from featcache.sweeping.tables import read_rows, tables

    rows = [{"seed": 0, "taps": [t], "head": "logreg", "shots": 0, "repeat": 0, "width": w, "chosen": {"C": 1.0},
             "val_acc": v, "test_acc": a, "macro_f1": a, "fit_s": 0.1}
            for t, w, v, a in (("wide", 900, 0.9, 0.99), ("narrow", 100, 0.9, 0.5), ("best", 500, 0.95, 0.1))]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table, _, _ = tables(read_rows(tmp_path))
    assert list(table["taps"]) == ["best", "narrow", "wide"]  # test accuracy never breaks a tie


def test_kept_runs_hold_only_the_backbones_their_taps_read(tmp_path, monkeypatch, image_folder):
    from click.testing import CliRunner

    import featcache.fuse.predict as frozen_predict
    from featcache.cli.commands import cli
    from featcache.runs.records import load_record

    runs = tmp_path / "runs"
    args = ["sweep", "--backbone", "tiny", "--backbone", "tiny2", "--weights", "random", "--image-size", "32",
            "--device", "cpu", "--limit-train", "150", "--limit-test", "40", "--combos", "singles", "--head", "logreg",
            "--keep", "3", "--score", "hscore", "--extract", "--cache-dir", str(tmp_path / "cache"), "--runs-dir",
            str(runs), "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    kept = sorted(p for p in runs.glob("[!.]*") if p.name != "sweeps")
    records = [load_record(p) for p in kept]
    assert len(kept) == 3 and len({p.name for p in kept}) == 3
    for record in records:
        assert record.config["backbones"] == sorted({t.rsplit(":", 1)[0] for t in record.taps})
    labels = CliRunner().invoke(cli, ["runs", "--runs-dir", str(runs), "--columns", "label"]).output.splitlines()[1:]
    assert len(set(labels)) == 3  # no two kept runs read the same
    built, original = [], frozen_predict.tap_model

    def counted(spec, *args, **kwargs):
        built.append(spec.name)
        return original(spec, *args, **kwargs)

    monkeypatch.setattr(frozen_predict, "tap_model", counted)
    photo = next(image_folder.rglob("*.png"))
    for path, record in zip(kept, records):
        built.clear()
        assert CliRunner().invoke(cli, ["predict", "--run", str(path), str(photo), "--device", "cpu"]).exit_code == 0
        assert built == record.config["backbones"]


def test_ties_with_the_best_on_validation_are_said_and_broken_toward_the_cheaper_model():
    from featcache.sweeping.tables import tables, top_lines

    def row(seed, taps, val, width):
        return {"seed": seed, "taps": taps, "head": "logreg", "shots": 0, "repeat": 0, "width": width,
                "chosen": {"C": 1}, "val_acc": val, "test_acc": 0.5, "macro_f1": 0.5, "fit_s": 0.1}

    rows = [row(0, ["b:late", "a:late"], 1.0, 24), row(0, ["a:late"], 1.0, 16), row(0, ["b:early"], 1.0, 16),
            row(0, ["a:early"], 0.9, 8)]
    table, _, _ = tables(rows)
    assert list(table["taps"]) == ["a:late", "b:early", "b:late+a:late", "a:early"]  # narrower first, test unread
    assert list(table["ties_best"]) == [True, True, True, False]
    said = top_lines(table)[-1]
    assert said.startswith("3 of 4 (combination, head) rows tie with the best on validation (1.0000, exactly)")
    seeds = [row(s, ["a:late"], v, 16) for s, v in ((0, 0.9), (1, 1.0))] + [row(s, ["a:early"], v, 8)
                                                                             for s, v in ((0, 0.94), (1, 0.9))]
    table, _, _ = tables(seeds)  # 0.95 +- a wide interval: 0.92 lies within it
    assert list(table["ties_best"]) == [True, True] and "within its 95% interval" in top_lines(table)[-1]
    alone, _, _ = tables([row(0, ["a:late"], 1.0, 16), row(0, ["a:early"], 0.5, 8)])
    assert not any("tie" in line for line in top_lines(alone))


@pytest.mark.parametrize("folds", [1, 5])
def test_the_tie_line_finishes_its_sentence_and_suggests_cv_only_without_it(folds):
    import pandas as pd

    from featcache.sweeping.tables import tie_line

    table = pd.DataFrame({"val_acc": [1.0, 1.0, 0.9], "val_acc_ci": [0.0, 0.0, 0.0], "seeds": [1, 1, 1],
                          "folds": [folds] * 3, "ties_best": [True, True, False]})
    line = tie_line(table)
    assert line.endswith("would tell them apart.") and "2 of 3 (combination, head) rows tie" in line
    assert ("--cv" in line) == (folds == 1)


def test_a_kept_run_reproduces_its_row_or_says_why_not(tmp_path):
    """logreg: the same rows, C and optimum, so the kept run's test accuracy is its row's; the svm's kept run
    predicts from calibrated probabilities, and its record says so (issue 41, point 4)."""
    import featcache
    from featcache.runs.records import load_record

    table = featcache.sweep(backbone=["tiny"], weights="random", image_size=32, device="cpu", limit_train=200,
                            limit_test=80, cache_dir=tmp_path / "cache", runs_dir=tmp_path / "runs", quiet=True,
                            combos="singles", head=["logreg", "svm"], keep=6, extract=True)
    rows = {(t, h): acc for t, h, acc in zip(table["taps"], table["head"], table["test_acc"])}
    records = [load_record(p) for p in (tmp_path / "runs").glob("2*")]
    assert len(records) == 6
    for record in records:
        row = rows[("+".join(record.taps), record.head)]
        if record.head == "logreg":
            assert record.metrics["accuracy"] == pytest.approx(row, abs=1e-12)
            assert not any("kept from" in w for w in record.warnings)
        else:
            assert any("calibrated by 3-fold cross-validation" in w for w in record.warnings)


def test_promise_order_and_the_early_stop():
    from featcache.sweeping.pairs import Stopper, promise_order

    a, b, c = "m:a", "m:b", "m:c"
    alone = {a: 0.9, b: 0.8, c: 0.7}
    # a+b: mean 0.85 but near copies (CKA 0.9): 0.85 * 0.55; a+c: 0.8 * (1 - 0.05); b+c: 0.75 * 0.9
    order = promise_order([(a, b), (a, c), (b, c)], alone, {(a, b): 0.9, (a, c): 0.1, (b, c): 0.2})
    assert order == [(a, c), (b, c), (a, b)]
    stopper = Stopper(2)
    assert [stopper.add(x) for x in (0.5, 0.6, 0.6, 0.55)] == [False, False, False, True]  # equal is no gain


def test_the_pair_search_by_promise_stops_early_and_shares_rows_with_the_exhaustive_sweep(tmp_path):
    """With patience 1 the search evaluates the singles, then pairs in its recorded order until one beats no
    earlier pair; its table holds exactly those; run again it computes nothing; the exhaustive sweep on the same
    folder computes only the pairs left."""
    from featcache.sweeping.pairs import Stopper
    from featcache.sweeping.run import sweep_and_keep

    cfg = _cfg(tmp_path, heads=("logreg",), keep=0, pair_search="promise", pair_patience=1)
    folder, count, _ = sweep_and_keep(cfg, log=lambda m: None)
    search = json.loads((folder / "sweep.json").read_text())["pair_search"]
    table = list(csv.DictReader(io.StringIO((folder / "table.csv").read_text())))
    singles = {r["taps"] for r in table if r["n_taps"] == "1"}
    pairs = {r["taps"]: float(r["val_acc"]) for r in table if r["n_taps"] == "2"}
    assert singles == {"tiny:stage1", "tiny:stage2", "tiny:stage3"} and search["of"] == 3
    evaluated = ["+".join(p) for p in search["order"][:search["evaluated"]]]
    assert set(pairs) == set(evaluated) and count == 3 + len(evaluated)
    stopper = Stopper(1)
    stops = [stopper.add(pairs[p]) for p in evaluated]
    assert (True in stops) == search["stopped_early"] and (not search["stopped_early"] or stops.index(True) ==
                                                           len(evaluated) - 1)
    assert sweep_and_keep(cfg, log=lambda m: None)[1] == 0  # resumed: every row is there
    exhaustive = dataclasses.replace(cfg, pair_search="all")
    assert sweep_and_keep(exhaustive, log=lambda m: None)[1] == 3 - len(evaluated)
    with pytest.raises(FeatcacheError, match="--combos must be pairs with --pair-search promise"):
        _cfg(tmp_path, combos="singles", pair_search="promise")
