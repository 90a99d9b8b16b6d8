"""The HTML report: one self-contained page and its CSV, drawn from run records."""

import csv
import dataclasses
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from featcache.cli.commands import cli
from featcache.reporting.page import ReportConfig, write_report
from featcache.runs.comparison import COLUMNS
from featcache.runs.records import load_record


@pytest.fixture(scope="module")
def report(report_runs):
    tmp, runs = report_runs
    out = write_report(ReportConfig(runs_dir=tmp / "runs", out=tmp / "reports" / "study.html", gradcam_images=2),
                       log=lambda m: None)
    return out, out.read_text(encoding="utf-8"), [load_record(r) for r in runs]


def test_report_is_one_self_contained_file_with_every_section(report):
    out, page, records = report
    # No network: nothing is fetched from elsewhere; every figure is an embedded PNG.
    assert not re.search(r'(src|href)="(https?:)?//', page)
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    for heading in ("Comparison", "Where time went", "Data"):
        assert f">{heading}</h2>" in page
    for record in records:
        assert re.search(rf'<section class="run" id="run-\d+-{re.escape(record["run"])}">', page)
    n = len(records)
    for kind in ("architecture", "confusion", "per_class", "predictions"):
        assert page.count(f'<figure class="{kind}">') == n, kind
    # Grad-CAM for every differentiable head; the RBF SVM says why it has none.
    rbf = sum(r["head"] == "svm" and r["selection"]["params"]["kernel"] == "rbf" for r in records)
    assert page.count('<figure class="gradcam">') == n - rbf
    assert page.count("Grad-CAM needs a differentiable head") == rbf
    # Curves for the epoch-trained runs; a note for heads fitted in one go.
    epoch_runs = sum(bool(r["curves"]) for r in records)
    assert page.count('<figure class="curves">') == epoch_runs
    assert page.count("is fitted in one go (no epochs)") == n - epoch_runs
    assert "fine-tuned (last-block)" in page and "Backbone weights are random" in page
    data = page.split('<h2 id="data">Data</h2>', 1)[1].split("</figure>", 1)[0]
    assert "validation: carved from train (stratified, seeded)" in data and "10 classes: 0, 1, 2" in data


def test_csv_next_to_the_html_holds_the_comparison_table(report):
    out, _, records = report
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS
    by_run = {r["run"]: r for r in rows}
    assert set(by_run) == {r["run"] for r in records}
    for record in records:
        row = by_run[record["run"]]
        assert float(row["test_acc"]) == pytest.approx(record["metrics"]["accuracy"])
        assert float(row["macro_f1"]) == pytest.approx(record["metrics"]["macro_f1"])
        assert row["variant"] == ("frozen" if record["kind"] == "frozen" else "fine-tuned (last-block)")


def test_time_section_uses_the_extraction_timing(report, report_runs):
    tmp, _ = report_runs
    _, page, _ = report
    [timing] = (tmp / "cache" / "digits").glob("*.timing.json")
    seconds = json.loads(timing.read_text())["seconds"]
    assert f"{seconds:.1f}</td>" in page


def test_pretrained_runs_get_no_random_weights_warning_and_missing_parts_say_why(report_runs, tmp_path):
    tmp, runs = report_runs
    copy = tmp_path / "runs" / runs[0].name
    shutil.copytree(runs[0], copy)
    record = json.loads((copy / "record.json").read_text())
    record["config"].update(weights="imagenet", dataset="folder", data_dir=str(tmp_path / "gone"))
    (copy / "record.json").write_text(json.dumps(record))
    out = write_report(ReportConfig(runs_dir=tmp_path / "runs", out=tmp_path / "r.html"), log=lambda m: None)
    page = out.read_text()
    assert "Backbone weights are random" not in page
    assert page.count("images unavailable: data directory") >= 2  # prediction grid and Grad-CAM say why
    assert '<figure class="confusion">' in page  # what the record alone can show is still drawn


def test_report_command_and_its_errors(report_runs, tmp_path, monkeypatch):
    tmp, runs = report_runs
    ok = CliRunner().invoke(cli, ["report", str(runs[0]), "--runs-dir", str(tmp / "runs"), "-o",
                                  str(tmp_path / "one.html"), "--gradcam-images", "0"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "one.html").exists() and (tmp_path / "one.csv").exists()
    assert '<figure class="gradcam">' not in (tmp_path / "one.html").read_text()
    empty = CliRunner().invoke(cli, ["report", "--runs-dir", str(tmp_path / "none")])
    assert empty.exit_code == 2 and "Error: no runs in" in empty.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad = CliRunner().invoke(cli, ["report", str(runs[0]), "-o", str(blocker / "r.html"), "--gradcam-images", "0"])
    assert bad.exit_code == 2 and f"Error: --out {blocker / 'r.html'}: {blocker} is a file, so nothing can be " \
        f"written below it" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    # a folder that exists but takes no file (issue 12: /proc/x.html drew every run, then failed): refused first
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    unwritable = os.geteuid() != 0  # root writes anywhere: /proc still refuses it
    target = (locked if unwritable else Path("/proc")) / "x.html"
    drawn = []
    from featcache.reporting import page as page_module

    monkeypatch.setattr(page_module, "_section", lambda *a: drawn.append(a) or {})
    refused = CliRunner().invoke(cli, ["report", str(runs[0]), "-o", str(target), "--gradcam-images", "0"])
    assert refused.exit_code == 2 and f"Error: cannot write {target}" in refused.output and drawn == []


def test_a_missing_grad_cam_import_is_a_note_not_a_crash(report_runs, tmp_path, monkeypatch):
    import sys

    tmp, runs = report_runs
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # import fails, as without libGL
    out = write_report(ReportConfig(runs=(str(runs[0]),), runs_dir=tmp / "runs", out=tmp_path / "r.html"),
                       log=lambda m: None)
    page = out.read_text()
    assert "Grad-CAM unavailable: cannot import pytorch_grad_cam" in page and '<figure class="gradcam">' not in page
    assert '<figure class="predictions">' in page


def test_a_backbone_given_without_chosen_taps_is_left_out_of_the_diagram(report, recwarn):
    """fuse-train --backbone a --backbone b --taps a:late uses no tap of b: the diagram draws a alone."""
    from featcache.reporting.page import _architecture

    _, _, records = report
    record = next(r for r in records if r["kind"] == "frozen")
    record = dataclasses.replace(record, config={**record["config"],
                                                 "backbones": [*record["config"]["backbones"], "resnet18"]})
    assert _architecture(record).startswith(b"\x89PNG")
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # was: mean of an empty slice


@pytest.mark.parametrize("true, predicted, n, shown", [
    ([0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 0], 3, [0, 1, 5]),  # a third mistakes
    ([0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2], 4, [0, 1, 2, 3]),  # no mistakes: all right
    ([0, 1, 2, 0], [1, 2, 0, 1], 1, [0]),  # all wrong, one asked: used to be none (Grad-CAM then crashed)
    ([0, 1, 2, 0], [1, 2, 0, 0], 3, [0, 1, 3]),  # one right: filled up with mistakes
    ([0, 1], [0, 0], 5, [0, 1]),  # fewer images than asked
    ([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4, [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4, 4, [0, 4, 8, 12]),  # each class
])
def test_shown_test_images_fill_up_to_n(true, predicted, n, shown):
    import numpy as np

    from featcache.reporting.page import pick_shown

    assert pick_shown(np.array(true), np.array(predicted), n).tolist() == shown


def test_names_from_data_reach_the_page_only_escaped(tmp_path):
    import html

    from conftest import HOSTILE, hostile_runs

    out = write_report(ReportConfig(runs_dir=hostile_runs(tmp_path), out=tmp_path / "r.html", gradcam_images=0),
                       log=lambda m: None)
    page = out.read_text()
    for name in HOSTILE.values():
        assert name not in page
    assert html.escape(HOSTILE["run"]) in page and html.escape(HOSTILE["folder"]) in page
    tags = _Tags()
    tags.feed(page)  # what a browser would build: no script but the page's own, no event handler, no foreign image
    assert not {"svg", "b"} & set(tags.names) and tags.names.count("script") == 1
    own = page.split("<script>", 1)[1].split("</script>", 1)[0]
    template = (Path(__file__).parent.parent / "featcache" / "reporting" / "templates" / "report.html.j2").read_text()
    assert own in template and "{{" not in own  # the sorting script, as written: nothing from data in it
    assert not [a for a in tags.attrs if a[0].startswith("on") or a == ("src", "x")]


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.names, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.names.append(tag)
        self.attrs.extend(attrs)


@pytest.mark.parametrize("n", [12, 7])
def test_prediction_grid_titles_do_not_reach_into_the_image_above(n):
    """The red two-line titles of wrong predictions sat on the image above them (issue 12)."""
    import numpy as np

    from featcache.reporting import figures

    images = np.zeros((n, 8, 8, 3), np.uint8)
    titles = ["✓ 7" if i % 2 else "✗ 8\n(true 9)" for i in range(n)]
    canvas, boxes = figures.grid_image(images, titles)
    assert len(boxes) == n

    def overlaps(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    for title, _ in boxes:
        for _, image in boxes:
            assert not overlaps(title, image), (title, image)
    for _, image in boxes:
        assert 0 <= image[0] and image[2] <= canvas.size[0] and image[3] <= canvas.size[1]
    drawn = np.asarray(canvas)  # the titles are drawn in their boxes: dark pixels there
    for title, _ in boxes:
        assert (drawn[title[1]:title[3], title[0]:title[2]] < 128).any()


def test_an_empty_heatmap_is_drawn_as_the_plain_image_and_named(monkeypatch):
    import numpy as np

    from featcache.reporting import figures

    texts = []
    real = figures.png
    monkeypatch.setattr(figures, "png", lambda fig: texts.extend(t.get_text() for ax in fig.axes for t in ax.texts)
                        or real(fig))
    image = np.full((1, 8, 8, 3), 0.5)
    out = figures.gradcam_grid(image, {"r:late": [np.zeros((8, 8, 3))]}, [0], [0], ["a"], {"r:late": (2, 2)},
                               {"r:late": [True]})
    assert out.startswith(b"\x89PNG") and texts == ["2x2 map; empty: all-zero gradients"]


def test_the_report_chooses_on_validation_never_on_test(tmp_path, report_runs):
    """Bold rows and the sweep's layer and pair plots rank by validation accuracy: the plots draw from tables with
    no test column at all, and the run with the best test but not the best validation accuracy is not bold."""
    import json
    import shutil

    import pandas as pd

    from featcache.reporting.sweeps import depth, pair_heatmap

    source, runs = report_runs
    folder = tmp_path / "runs"
    shutil.copytree(source / "runs", folder)
    chosen, tested = [folder / runs[0].name, folder / runs[1].name]
    for run, (val, test) in ((chosen, (0.99, 0.5)), (tested, (0.6, 0.98))):
        record = json.loads((run / "record.json").read_text())
        record["selection"]["val_accuracy"], record["metrics"]["accuracy"] = val, test
        (run / "record.json").write_text(json.dumps(record))
    page = tmp_path / "r.html"
    result = CliRunner().invoke(cli, ["report", "--runs-dir", str(folder), "-o", str(page), "--gradcam-images", "0",
                                      "--grid-images", "0"])
    assert result.exit_code == 0, result.output
    bold = [line for line in page.read_text().splitlines() if '<tr class="best">' in line]
    assert len(bold) == 1
    rows = page.read_text().split('<tr class="best">', 1)[1].split("</tr>", 1)[0]
    assert chosen.name in rows and tested.name not in rows
    no_test = pd.DataFrame({"taps": ["a:x", "a:y", "a:x+a:y"], "head": "logreg", "val_acc": [0.5, 0.7, 0.8],
                            "val_acc_ci": 0.0, "n_taps": [1, 1, 2]})
    assert depth(no_test[no_test["n_taps"] == 1], ["a:x", "a:y"]).startswith(b"\x89PNG")
    assert pair_heatmap(no_test[no_test["n_taps"] == 2], "logreg", ["a:x", "a:y"],
                        no_test[no_test["n_taps"] == 1]).startswith(b"\x89PNG")


def test_time_spent_counts_a_shared_extraction_pass_once(tmp_path):
    """Three backbones extracted in one 2.4 s pass: 2.4 s of extraction, not 7.2 (each cache's timing file holds
    the pass's seconds); a cache extracted alone adds its own."""
    import json
    from types import SimpleNamespace

    from featcache.extraction.store import timing_file
    from featcache.reporting.page import _time_spent

    caches = {}
    for name, seconds, shared in (("a", 2.4, ["a", "b", "c"]), ("b", 2.4, ["a", "b", "c"]),
                                  ("c", 2.4, ["a", "b", "c"]), ("d", 1.0, ["d"])):
        path = tmp_path / f"{name}-0123456789ab.h5"
        timing_file(path).write_text(json.dumps({"seconds": seconds, "images": 10, "shared_pass": shared}))
        caches[name] = {"path": str(path), "fingerprint": name}
    record = SimpleNamespace(caches=caches, finetuned=False, timings={"fit_seconds": 0.5})
    parts, rows = _time_spent([record])
    assert parts["extraction (each pass once)"] == pytest.approx(3.4)
    assert [r["shared"] for r in rows] == [["b", "c"], ["a", "c"], ["a", "b"], []]


def test_a_report_of_named_runs_holds_those_and_a_whole_folder_only_when_asked(tmp_path):
    """`featcache report RUN` pulled in every sweep and ranking of the runs folder (issue 41); now it holds what was
    named: runs, sweep folders, ranking folders; with nothing named, the whole folder."""
    flags = ["--backbone", "tiny", "--weights", "random", "--image-size", "32", "--device", "cpu", "--limit-train",
             "120", "--limit-test", "40", "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs")]
    swept = CliRunner().invoke(cli, ["sweep", *flags, "--combos", "singles", "--head", "logreg", "--keep", "1", "-q",
                                     "--extract"])
    assert swept.exit_code == 0, swept.output
    [sweep] = (tmp_path / "runs" / "sweeps").glob("[!.]*")
    [kept] = [p for p in (tmp_path / "runs").glob("[!.]*") if p.name != "sweeps"]

    def page(*named):
        out = tmp_path / f"r{len(named)}.html"
        done = CliRunner().invoke(cli, ["report", *map(str, named), "--runs-dir", str(tmp_path / "runs"), "-o",
                                        str(out), "--gradcam-images", "0", "--grid-images", "0", "--force"])
        assert done.exit_code == 0, done.output
        return out.read_text()

    only_run = page(kept.name)
    assert kept.name in only_run and sweep.name not in only_run
    only_sweep = page(sweep.name)
    assert sweep.name in only_sweep and kept.name not in only_sweep
    assert sweep.name in page() and kept.name in page()


def test_sections_are_titled_as_a_person_says_them_and_every_stage_has_its_time(tmp_path, monkeypatch):
    """Issue 41, point 3: sections titled by backbones, dataset and heads (not hashes), the ranking's random-weights
    note, and the sweeps' seconds among the stages' times."""
    import featcache.reporting.figures as figures

    flags = ["--backbone", "tiny", "--weights", "random", "--image-size", "32", "--device", "cpu", "--limit-train",
             "120", "--limit-test", "40", "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs")]
    assert CliRunner().invoke(cli, ["sweep", *flags, "--combos", "singles", "--head", "logreg,knn", "--keep", "0",
                                    "-q", "--extract"]).exit_code == 0
    ranked = CliRunner().invoke(cli, ["rank", *flags, "--score", "logme", "-q", "--num-workers", "0"])
    assert ranked.exit_code == 0, ranked.output
    parts = {}
    real = figures.time_spent
    monkeypatch.setattr(figures, "time_spent", lambda p: parts.update(p) or real(p))
    out = tmp_path / "r.html"
    done = CliRunner().invoke(cli, ["report", "--runs-dir", str(tmp_path / "runs"), "-o", str(out)])
    assert done.exit_code == 0, done.output
    page = out.read_text()
    assert "Sweep: tiny on digits, logreg, knn</h2>" in page and "Ranking: tiny on digits</h2>" in page
    assert "in this ranking" in page  # the ranking's random-weights note
    assert parts["sweeps (probes and scores)"] > 0


def test_many_lines_become_small_multiples_and_no_axis_has_an_offset():
    import matplotlib.pyplot as plt
    import pandas as pd

    from featcache.reporting.figures import png
    from featcache.reporting.sweeps import depth

    order = [f"b{b}:t{t}" for b in range(6) for t in range(3)]
    singles = pd.DataFrame([{"taps": tap, "head": head, "val_acc": 0.5 + 0.01 * i, "val_acc_ci": 0.01}
                            for i, tap in enumerate(order) for head in ("logreg", "knn")])
    drawn = []
    real = plt.subplots
    plt.subplots = lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1]
    try:
        depth(singles, order)  # 12 lines: a panel per backbone
        depth(singles[singles["taps"].str.startswith("b0")], order)  # 2 lines: one axes
    finally:
        plt.subplots = real
    assert sum(ax.get_visible() for ax in drawn[0][1].flat) == 6 and drawn[1][1].size == 1
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1 + 1e-9, 1 + 2e-9])
    png(fig)
    assert ax.yaxis.get_major_formatter().get_offset() == ""
