"""featcache choose: known answers on backbones built to them, the decision's statistics, bad input."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from known import colour_folder

from featcache.choosing.decide import decide, mcnemar, p_best, trust
from featcache.cli.commands import cli

ARGS = ["--weights", "random", "--image-size", "24", "--device", "cpu", "--num-workers", "0", "-q", "--cv", "3"]


def choose(tmp_path, data, *extra):
    return CliRunner().invoke(cli, ["choose", "--data-dir", str(data), *ARGS, "--cache-dir", str(tmp_path / "cache"),
                                    "--runs-dir", str(tmp_path / "runs"), *extra])


def answer(tmp_path) -> dict:
    [folder] = (tmp_path / "runs" / "choices").glob("[!.]*")
    return json.loads((folder / "answer.json").read_text())


def test_the_informative_tap_is_recommended_its_twin_tied_and_the_faster_twin_the_fast_choice(tmp_path):
    data = colour_folder(tmp_path / "photos")
    result = choose(tmp_path, data, "--backbone", "known_fast", "--backbone", "known_slow")
    assert result.exit_code == 0, result.output
    got = answer(tmp_path)
    r = got["recommended"]
    assert all(t.endswith(":signal") for t in r["taps"]) and r["cv_accuracy"] > 0.95 and r["p_best"] >= 0.9
    assert got["beats_chance"] and r["test_accuracy"] > 0.9
    tied = {t["candidate"] for t in got["tied"]}
    assert {"known_fast:signal", "known_slow:signal"} <= tied and not any("noise" in t and "+" not in t for t in tied)
    assert got["fast"]["candidate"] == "known_fast:signal"
    lines = result.output.strip().splitlines()
    assert len(lines) <= 12 and lines[0].startswith("recommended: ") and "fast choice: " in result.output


def test_two_taps_each_holding_half_the_classes_fused_beat_either_alone_and_test_labels_decide_nothing(tmp_path):
    data = colour_folder(tmp_path / "photos", seed=3)
    assert choose(tmp_path, data, "--backbone", "known_halves").exit_code == 0
    first = answer(tmp_path)
    assert sorted(first["recommended"]["taps"]) == ["known_halves:blue", "known_halves:red"]
    alone = [f for f in first["finalists"] if "+" not in f["candidate"]]
    assert all(f["cv_accuracy"] < first["recommended"]["cv_accuracy"] - 0.1 for f in alone)
    shuffled = colour_folder(tmp_path / "shuffled", seed=3, shuffle_test=True)  # the same train, test relabelled
    again = tmp_path / "again"
    assert choose(again, shuffled, "--backbone", "known_halves").exit_code == 0
    second = answer(again)
    assert second["recommended"]["test_accuracy"] != first["recommended"]["test_accuracy"]
    def decided(entry):  # all but the one test figure and the speed, measured each run
        return {k: v for k, v in entry.items() if k not in ("test_accuracy", "images_per_s")}

    for key in ("recommended", "fast"):
        assert decided(second[key]) == decided(first[key]), key
    assert [decided(t) for t in second["tied"]] == [decided(t) for t in first["tied"]]


def test_data_without_signal_claims_no_recommendation(tmp_path):
    data = colour_folder(tmp_path / "photos", signal=False)
    result = choose(tmp_path, data, "--backbone", "known_fast", "--singles")
    assert result.exit_code == 0, result.output
    assert not answer(tmp_path)["beats_chance"]
    assert result.output.startswith("no recommendation (nothing beats chance)")


@pytest.mark.parametrize(("extra", "code", "message"), [
    (["--backbone", "nothing_matches*"], 2, "matches no"),
    (["--backbone", "known_fast", "--budget", "10"], 2, "too small for one round"),
    (["--backbone", "known_fast", "--budget", "lots"], 2, "--budget"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, extra, code, message):
    data = colour_folder(tmp_path / "photos", per_class=3)
    result = choose(tmp_path, data, *extra)
    assert result.exit_code == code and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "runs" / "choices").exists()


def test_a_budget_in_seconds_too_short_for_full_rounds_takes_the_fewest_and_says_so(tmp_path):
    from featcache.choosing.request import parse_budget

    assert parse_budget("60") == (60, None) and parse_budget("90s") == (None, 90.0)
    assert parse_budget("1.5m") == (None, 90.0) and parse_budget("auto") == (None, None)
    data = colour_folder(tmp_path / "photos", per_class=12)
    result = choose(tmp_path, data, "--backbone", "known_halves", "--budget", "0.001s")
    assert result.exit_code == 0, result.output
    got = answer(tmp_path)
    assert got["cramped"] and len(got["finalists"]) == 2 and "budget was too small" in result.output


def test_one_class_and_every_model_failing(tmp_path, monkeypatch):
    data = tmp_path / "one"
    colour_folder(data, per_class=6)
    for extra in ("class1", "class2", "class3"):
        for f in (data / "train" / extra).iterdir():
            f.rename(data / "train" / "class0" / f"{extra}_{f.name}")
        (data / "train" / extra).rmdir()
    result = choose(tmp_path, data, "--backbone", "known_fast")
    assert result.exit_code == 2 and "one class" in result.output, result.output
    import featcache.ranking.run as run

    monkeypatch.setattr(run, "_scored", lambda *a: (_ for _ in ()).throw(RuntimeError("no memory left")))
    result = choose(tmp_path, colour_folder(tmp_path / "photos", per_class=6), "--backbone", "known_fast")
    assert result.exit_code == 1 and "every model failed" in result.output and "no memory left" in result.output


def test_p_best_the_tied_set_and_the_fast_choice_from_paired_predictions():
    rng = np.random.default_rng(0)
    truth = rng.random(400) < 0.9
    correct = np.stack([truth, truth, rng.random(400) < 0.5])  # two alike, one far worse
    verdict = decide(correct, speed=np.array([10.0, 50.0, 99.0]), params=np.array([5, 1, 1]), chance=0.5)
    assert verdict.p_best[0] == verdict.p_best[1] == 1.0 and verdict.p_best[2] == 0.0
    assert sorted(verdict.tied) == [0, 1] and verdict.fast == 1 and verdict.recommended == 1  # equal: the faster
    assert mcnemar(correct[0], correct[2]) < 1e-6 and mcnemar(correct[0], correct[1]) == 1.0
    low, high = verdict.interval
    assert low < correct[1].mean() < high
    probability, boot = p_best(correct[[0, 2]], resamples=200)
    assert boot.shape == (2, 200) and probability[0] == 1.0


def test_trust_names_a_score_that_anticorrelates_or_cannot_separate():
    accuracy = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    rows = {r["name"]: r for r in trust({"good": accuracy * 2, "reversed": -accuracy, "flat": np.ones(5),
                                         "model size": np.array([5, 4, 3, 2, 1.0])}, accuracy,
                                        {"good", "reversed", "flat"})}
    assert rows["good"]["informative"] and rows["good"]["kendall_tau"] == pytest.approx(1.0)
    assert rows["good"]["regret"] == 0.0
    assert not rows["reversed"]["informative"] and rows["reversed"]["regret"] == pytest.approx(0.4)
    assert not rows["flat"]["informative"] and "cannot tell" in rows["flat"]["why"]
    assert rows["random order"]["regret"] == pytest.approx(0.2) and rows["model size"]["informative"] is None


def test_the_api_returns_the_choice_and_the_report_shows_it_first(tmp_path):
    import featcache
    from featcache.choosing.answer import Choice
    from featcache.errors import FeatcacheError

    data = colour_folder(tmp_path / "photos", per_class=15, seed=5)
    choice = featcache.choose(data_dir=data, backbone=["known_halves"], weights="random", image_size=24,
                              device="cpu", num_workers=0, cv=3, cache_dir=tmp_path / "cache",
                              runs_dir=tmp_path / "runs", quiet=True)
    assert isinstance(choice, Choice) and choice.folder.parent == tmp_path / "runs" / "choices"
    assert repr(choice).splitlines()[0].startswith("recommended: ") and len(repr(choice).splitlines()) <= 12
    assert choice.sentence() in choice._repr_html_() and set(choice.table["round"]) == {"decide"}
    assert choice.recommended["candidate"] in set(choice.table["candidate"])
    out = featcache.report(runs=[str(choice.folder)], runs_dir=tmp_path / "runs", out=tmp_path / "r.html",
                           quiet=True)
    page = out.read_text()
    import html

    assert html.escape(choice.sentence()) in page and "How far to trust each score on this data" in page
    assert page.index('id="choice-1"') < page.index("P(best) of each finalist")
    assert "The backbones' weights are random" in page
    (choice.folder / "answer.json").write_text('{"kind": "choice", "recommended": {"cv_accuracy": "high"}}')
    with pytest.raises(FeatcacheError, match="is not an answer featcache choose wrote"):
        Choice.load(choice.folder)
    page = featcache.report(runs=[str(choice.folder)], runs_dir=tmp_path / "runs", out=tmp_path / "r2.html",
                            quiet=True).read_text()
    assert "could not be read" in page and f"choices/{choice.folder.name}" in page


def test_the_imagenet_baseline_reads_torchvisions_weights_metadata_offline():
    from featcache.backbones.sources import top1_of

    assert top1_of("resnet18") == pytest.approx(69.758) and top1_of("mobilenet_v2") == pytest.approx(72.154)
    assert top1_of("known_fast") is None  # a model without published weights has no baseline value


def test_the_same_request_on_the_same_screen_is_served_and_a_changed_screen_is_chosen_again(tmp_path):
    data = colour_folder(tmp_path / "photos", per_class=12, seed=9)
    first = choose(tmp_path, data, "--backbone", "known_halves")
    assert first.exit_code == 0 and "written to" in first.output
    again = choose(tmp_path, data, "--backbone", "known_halves")
    assert again.exit_code == 0 and "served from" in again.output, again.output
    assert again.output.splitlines()[:3] == first.output.splitlines()[:3]  # the same answer, nothing probed again
    [ranking] = (tmp_path / "runs" / "ranks").glob("[!.]*")
    (ranking / "table.csv").write_text((ranking / "table.csv").read_text() + "\n")  # the screen differs
    import featcache.ranking.run as run

    real = run.write_table
    try:  # keep the changed table: the screen no longer matches the answer's
        run.write_table = lambda folder, rows, scores: __import__("pandas").read_csv(folder / "table.csv")
        third = choose(tmp_path, data, "--backbone", "known_halves")
    finally:
        run.write_table = real
    assert third.exit_code == 0 and "written to" in third.output, third.output
