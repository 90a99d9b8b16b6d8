"""Run records: one schema (RunRecord), and the records earlier releases wrote still load."""

import json
import shutil
from pathlib import Path

import pytest

from featcache.errors import FeatcacheError
from featcache.runs.comparison import comparison_table
from featcache.runs.records import SCHEMA, RunRecord, load_record

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["record-0.1.0-frozen-mlp.json", "record-0.1.0-finetuned.json"])
def test_records_written_by_release_0_1_0_still_load(tmp_path, name):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIXTURES / name, run / "record.json")
    record = load_record(run)
    assert isinstance(record, RunRecord) and record.schema == 1  # no schema field then: version 1
    saved = json.loads((FIXTURES / name).read_text())
    assert record.metrics == saved["metrics"] and record["taps"] == saved["taps"]
    assert record.finetuned == (saved["kind"] == "finetuned")
    [row] = comparison_table([record]).to_dict("records")
    assert row["run"] == saved["run"] and row["test_acc"] == saved["metrics"]["accuracy"]


def test_a_record_round_trips_and_a_newer_or_broken_one_is_one_line(tmp_path):
    saved = json.loads((FIXTURES / "record-0.1.0-frozen-mlp.json").read_text())
    record = RunRecord.from_json(saved, Path("x"))
    again = RunRecord.from_json(json.loads(record.to_json()), Path("x"))
    assert again == record and json.loads(record.to_json())["schema"] == SCHEMA
    with pytest.raises(FeatcacheError, match=r"written by a newer featcache \(record schema 99"):
        RunRecord.from_json({**saved, "schema": 99}, Path("x"))
    with pytest.raises(FeatcacheError, match="is not a complete run record: metrics missing"):
        RunRecord.from_json({k: v for k, v in saved.items() if k != "metrics"}, Path("x"))
    with pytest.raises(FeatcacheError, match="kind must be one of frozen, finetuned. Got 'other'"):
        RunRecord.from_json({**saved, "kind": "other"}, Path("x"))


def test_runs_report_and_predict_find_a_pipelines_runs_one_folder_down(report_runs, tmp_path):
    from click.testing import CliRunner

    from featcache.cli.commands import cli

    _, runs = report_runs
    for run in runs[:2]:  # as `featcache run` keeps them: runs/<pipeline>/<run>
        shutil.copytree(run, tmp_path / "runs" / "study" / run.name)
    shutil.copytree(runs[2], tmp_path / "runs" / runs[2].name)
    listed = CliRunner().invoke(cli, ["runs", "--runs-dir", str(tmp_path / "runs"), "--columns", "run,label"])
    assert listed.exit_code == 0 and all(r.name in listed.output for r in runs[:3])
    only = CliRunner().invoke(cli, ["runs", "--runs-dir", str(tmp_path / "runs"), "--pipeline", "study", "--columns", "run"])
    assert only.exit_code == 0 and runs[0].name in only.output and runs[2].name not in only.output
    page = CliRunner().invoke(cli, ["report", "--runs-dir", str(tmp_path / "runs"), "-o", str(tmp_path / "r.html"),
                                    "--gradcam-images", "0", "--pipeline", "study"])
    assert page.exit_code == 0 and runs[1].name in (tmp_path / "r.html").read_text()
    empty = CliRunner().invoke(cli, ["runs", "--runs-dir", str(tmp_path / "none")])
    assert empty.exit_code == 2 and f"no runs in {tmp_path / 'none'} or its sub-folders" in empty.output
    wrong = CliRunner().invoke(cli, ["runs", "--runs-dir", str(tmp_path / "runs"), "--pipeline", "stduy"])
    assert wrong.exit_code == 2 and "pipelines there: study" in wrong.output


def test_a_run_is_found_by_name_one_folder_down(report_runs, tmp_path):
    from featcache.runs.records import resolve_run

    _, runs = report_runs
    copy = shutil.copytree(runs[0], tmp_path / "runs" / "study" / runs[0].name)
    assert resolve_run(runs[0].name, tmp_path / "runs") == copy


@pytest.mark.parametrize("width", [100, 60, 30])
def test_the_runs_table_fits_the_terminal_and_keeps_what_tells_runs_apart(width):
    import pandas as pd

    from featcache.runs.comparison import TERMINAL_COLUMNS, as_text

    long = "r18+efficientnet_b0+timm:convnext_atto"
    table = pd.DataFrame({"label": [f"{long} · {taps} · logreg" for taps in ("stage1", "stage2+stage3", "block4")],
                          "chosen": "C=0.1", "val_acc": [0.9, 0.8, 0.7], "test_acc": 0.5, "macro_f1": 0.5,
                          "fit_s": 1.0, "warnings": 2, "run": [f"20261205-0{i}-{long}-{i}" for i in range(3)]})
    text = as_text(table[TERMINAL_COLUMNS], width)
    lines = text.splitlines()
    assert max(map(len, lines)) <= width
    assert len({line.split("  ")[0] for line in lines[1:]}) == 3  # the labels still differ
    assert all(line.split("  ")[0].rstrip().endswith("· logreg") for line in lines[1:])  # cut at the start


def test_at_80_columns_a_label_loses_its_time_before_what_tells_runs_apart():
    import pandas as pd

    from featcache.runs.comparison import TERMINAL_COLUMNS, as_text

    labels = [f"r18+mnv2 · layer4+features.18 · logreg · {cv} · 12-07 14:0{i}:03"
              for i, cv in enumerate(("cv 5", "val split"))]
    table = pd.DataFrame({"label": labels, "chosen": "C=0.1", "val_acc": [0.9, 0.8], "test_acc": 0.5,
                          "macro_f1": 0.5, "fit_s": 1.0, "warnings": 0, "run": ["a", "b"]})
    lines = as_text(table[TERMINAL_COLUMNS], 80).splitlines()
    assert max(map(len, lines)) <= 80
    shown = [line.split("  ")[0] for line in lines[1:]]
    assert shown[0].startswith("r18+mnv2 · layer4+features.18 · logreg · cv 5") and "14:0" not in shown[0]
    assert "val split" in shown[1]


def test_runs_without_a_terminal_is_at_most_100_columns(report_runs, monkeypatch):
    from click.testing import CliRunner

    from featcache.cli.commands import cli

    monkeypatch.setenv("COLUMNS", "160")  # a shell's width, not the pipe's reader's
    _, runs = report_runs
    every = "label,dataset,backbones,weights,taps,fusion,head,chosen,variant,val_acc,test_acc,fit_s,run"
    wide = CliRunner().invoke(cli, ["runs", "--runs-dir", str(runs[0].parent), "--columns", every, "--width", "400"])
    assert max(map(len, wide.output.splitlines())) > 100  # what would be printed at the shell's width
    shown = CliRunner().invoke(cli, ["runs", "--runs-dir", str(runs[0].parent), "--columns", every])
    assert shown.exit_code == 0 and max(map(len, shown.output.splitlines())) <= 100
