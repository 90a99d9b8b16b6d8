"""featcache rank: many backbones' taps scored, a failing model recorded, resumable, checked against probes."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from tiny import TINY, TinyNet

from featcache.backbones.registry import BACKBONES, register_backbone
from featcache.cli.commands import cli
from featcache.errors import FeatcacheError


def _seeded(k):
    def build(weights):
        torch.manual_seed(100 + k)  # each model its own random weights, so the scores differ
        return TinyNet()
    return build


def _broken(weights):
    raise RuntimeError("this network cannot be built")


for _k, _name in enumerate(("rank_a", "rank_b", "rank_c", "rank_d", "rank_e", "rank_f")):
    if _name not in BACKBONES:
        register_backbone(dataclasses.replace(TINY, name=_name, build=_broken if _name == "rank_c" else _seeded(_k)))

ARGS = ["--dataset", "digits", "--limit-train", "150", "--limit-test", "60", "--weights", "random",
        "--image-size", "32", "--device", "cpu", "--num-workers", "0", "-q"]


def rank(tmp_path, *extra, folder="runs"):
    result = CliRunner().invoke(cli, ["rank", "--backbone", "rank_*", *ARGS, "--cache-dir", str(tmp_path / "cache"),
                                      "--runs-dir", str(tmp_path / folder), *extra])
    return result


def test_a_rank_over_six_models_records_the_failing_one_and_goes_on(tmp_path):
    result = rank(tmp_path, "--models-at-once", "2", "--score", "logme,hscore,hscore_reg")
    assert result.exit_code == 0, result.output
    [folder] = (tmp_path / "runs" / "ranks").glob("[!.]*")
    table = pd.read_csv(folder / "table.csv")
    ok = table[table["status"] == "ok"]
    assert sorted(set(ok["model"])) == ["rank_a", "rank_b", "rank_d", "rank_e", "rank_f"] and len(ok) == 15
    assert list(ok["logme"]) == sorted(ok["logme"], reverse=True)  # best first by the first score
    failed = table[table["status"] == "failed"]
    assert list(failed["model"]) == ["rank_c"] and "this network cannot be built" in failed["reason"].iloc[0]
    assert "1 model(s) failed" in result.output and "rank_c: " in result.output
    assert (ok["params"] > 0).all() and (ok["images_per_s"] > 0).all() and set(ok["width"]) == {8, 12, 16}
    rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["rank_a", "rank_b", "rank_c", "rank_d", "rank_e", "rank_f"]
    again = rank(tmp_path, "--models-at-once", "2", "--score", "logme,hscore,hscore_reg", folder="again")
    assert again.exit_code == 0
    [other] = (tmp_path / "again" / "ranks").glob("[!.]*")
    measured = ["images_per_s"]  # timed each run; every other number is the same, every run
    assert pd.read_csv(other / "table.csv").drop(columns=measured).equals(table.drop(columns=measured))


def test_a_killed_rank_resumes_without_redoing_a_finished_model(tmp_path, monkeypatch):
    import featcache.ranking.run as run
    from featcache.ranking.run import read_rows

    real, calls = run._group, []

    def killed_after_one_group(request, group, *args):
        calls.append(list(group))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(request, group, *args)

    monkeypatch.setattr(run, "_group", killed_after_one_group)
    assert rank(tmp_path, "--models-at-once", "2").exit_code != 0
    monkeypatch.setattr(run, "_group", lambda request, group, *args: calls.append(list(group)) or real(request, group,
                                                                                                     *args))
    [rows] = (tmp_path / "runs" / "ranks").glob("[!.]*/rows.jsonl")
    with open(rows, "a") as f:
        f.write('{"model": "rank_c", "status": "ok", "ta')  # a row cut short by the kill
    result = rank(tmp_path, "--models-at-once", "2")
    assert result.exit_code == 0, result.output
    assert calls == [["rank_a", "rank_b"], ["rank_c", "rank_d"], ["rank_c", "rank_d"], ["rank_e", "rank_f"]]
    assert "resuming: 2 of 6 models" in result.output
    assert sorted(read_rows(rows.parent)) == ["rank_a", "rank_b", "rank_c", "rank_d", "rank_e", "rank_f"]


def test_confirm_gives_each_scores_kendall_tau_as_scipy_does(tmp_path):
    from scipy.stats import kendalltau

    result = rank(tmp_path, "--confirm", "4", "--score", "logme,hscore")
    assert result.exit_code == 0, result.output
    [folder] = (tmp_path / "runs" / "ranks").glob("[!.]*")
    checked, taus = pd.read_csv(folder / "confirm.csv"), pd.read_csv(folder / "tau.csv")
    assert 4 <= len(checked) <= 8 and {"logreg_val_acc", "knn_test_acc"} <= set(checked.columns)
    for _, row in taus.iterrows():
        assert row["kendall_tau"] == pytest.approx(kendalltau(checked[row["score"]], checked["logreg_val_acc"])[0])
    assert "Kendall tau" in result.output
    report = CliRunner().invoke(cli, ["report", "--runs-dir", str(tmp_path / "runs"), "-o", str(tmp_path / "r.html")])
    assert report.exit_code == 0, report.output
    page = (tmp_path / "r.html").read_text()
    section = page.split('<h2 id="rank-1">', 1)[1].split("<h2", 1)[0]
    assert "6 models, 15 taps scored by logme, hscore" in section and "rank_c</code>: " in section
    assert section.count('<img src="data:image/png;base64,') == 2  # agreement and the Pareto front
    for _, row in taus.iterrows():
        assert f"<strong>{row['score']}</strong> {row['kendall_tau']:+.2f}" in section


def test_keep_caches_none_leaves_no_cache_the_ranking_made(tmp_path):
    assert rank(tmp_path, "--keep-caches", "none", "--score", "hscore").exit_code == 0
    assert not list((tmp_path / "cache").rglob("*.h5"))
    result = rank(tmp_path, "--keep-caches", "top-2", "--score", "hscore", "--confirm", "4", folder="top")
    assert result.exit_code == 0, result.output  # confirmed first, from every cache; then pruned
    assert len(list((tmp_path / "cache").rglob("*.h5"))) == 2


@pytest.mark.parametrize(("extra", "message"), [
    (["--score", "logmee"], "did you mean 'logme'"),
    (["--backbone", "nothing_like_it*"], "matches no model"),
    (["--max-models", "3"], "matches 6 models, more than --max-models 3"),
    (["--confirm", "99"], "--confirm 99 is more than the"),
    (["--keep-caches", "some"], "be all, none or top-K"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, extra, message):
    result = rank(tmp_path, *extra)
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_rank_from_python_and_a_pipeline_table_build_the_same_request():
    import featcache
    from featcache.pipeline.stages import STAGES
    from featcache.requests import API, PIPELINE, build

    assert "rank" in STAGES and callable(featcache.rank)
    from_python = build(STAGES["rank"].request, {"backbone": ["rank_*"], "score": ["logme", "hscore"]}, API)
    from_file = build(STAGES["rank"].request, {"backbone": ["rank_*"], "score": "logme,hscore"}, PIPELINE)
    assert from_python == from_file and from_python.score == ("logme", "hscore")
    with pytest.raises(FeatcacheError, match="needs --backbone"):
        from featcache.ranking.run import resolve

        resolve(())


def test_the_pareto_front_keeps_the_points_no_other_beats_on_speed_and_accuracy():
    import numpy as np

    from featcache.reporting.ranks import front

    rate = np.array([100.0, 50.0, 400.0, 200.0, 300.0])
    accuracy = np.array([0.9, 0.95, 0.6, 0.7, 0.5])
    assert list(front(rate, accuracy)) == [2, 3, 0, 1]  # 300 img/s at 0.5 is beaten by 400 at 0.6


def test_a_sweep_with_head_none_gives_the_scores_alone(tmp_path, monkeypatch):
    """--head none: the scores alone, the same whether the combinations are decomposed two at a time in threads
    or in turn."""
    def flags(runs):
        return ["sweep", "--backbone", "rank_a", *[a for a in ARGS if a not in ("--num-workers", "0")], "--cache-dir",
                str(tmp_path / "cache"), "--runs-dir", str(tmp_path / runs), "--extract", "--combos", "pairs"]

    def scored(runs, threads):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        result = CliRunner().invoke(cli, [*flags(runs), "--head", "none", "--score", "logme,hscore_reg"])
        assert result.exit_code == 0, result.output
        [folder] = (tmp_path / runs / "sweeps").glob("[!.]*")
        return result, pd.read_csv(folder / "scores.csv").sort_values(["score", "taps"]).reset_index()

    result, scores = scored("runs", 2)
    assert len(scores) == 2 * 6 and set(scores["score"]) == {"logme", "hscore_reg"}  # 3 taps + 3 pairs
    assert np.allclose(scored("serial", 1)[1]["value"], scores["value"], rtol=1e-10, atol=0)
    monkeypatch.undo()
    folder = next((tmp_path / "runs" / "sweeps").glob("[!.]*"))
    assert len(pd.read_csv(folder / "table.csv")) == 0 and "   val   ±95%" not in result.output  # no probe lines
    refused = CliRunner().invoke(cli, [*flags("runs"), "--head", "none"])
    assert refused.exit_code == 2 and "come with --score" in refused.output


def test_leep_and_nce_read_the_logits_tap_which_is_the_models_own_output(tmp_path):
    """--logits stores the source classifier's output as a tap (the tiny network's fc on its pooled last stage,
    exactly); rank's LEEP and NCE score that tap alone, the sweep's one row per backbone; without --logits the
    sweep refuses them in one line, and a model without a classifier says so."""
    import numpy as np

    from featcache.backbones.sources import with_logits
    from featcache.backbones.weights import build_backbone
    from featcache.extraction.reader import FeatureCache
    from featcache.sweeping.scorers import leep, nce

    result = CliRunner().invoke(cli, ["rank", "--backbone", "rank_a", *ARGS, "--cache-dir", str(tmp_path / "cache"),
                                      "--runs-dir", str(tmp_path / "runs"), "--score", "logme,leep,nce", "--dtype",
                                      "float32"])
    assert result.exit_code == 0, result.output
    [folder] = (tmp_path / "runs" / "ranks").glob("[!.]*")
    table = pd.read_csv(folder / "table.csv").set_index("tap")
    assert sorted(table.index) == ["logits", "stage1", "stage2", "stage3"] and table.loc["logits", "width"] == 10
    assert table["leep"].notna().tolist() == [t == "logits" for t in table.index] == table["nce"].notna().tolist()
    [cache] = (tmp_path / "cache").rglob("rank_a-*.h5")
    with FeatureCache(cache) as c:
        logits, pooled, labels = c.read("train", "logits"), c.read("train", "stage3"), c.labels("train")
    fc = build_backbone(BACKBONES["rank_a"], "random", 0).fc
    with torch.no_grad():
        expected = fc(torch.from_numpy(pooled)).numpy()
    assert np.allclose(logits, expected, atol=1e-4)
    from featcache.fuse.evaluate import validation_split

    fit_rows, _ = validation_split(labels, 0.1, 0, None)
    assert table.loc["logits", "leep"] == pytest.approx(leep(logits[fit_rows], labels[fit_rows], 10), rel=1e-6)
    assert table.loc["logits", "nce"] == pytest.approx(nce(logits[fit_rows], labels[fit_rows], 10), rel=1e-6)

    flags = ["sweep", "--backbone", "rank_a", *[a for a in ARGS if a not in ("--num-workers", "0")], "--cache-dir",
             str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"), "--extract", "--combos", "singles",
             "--head", "none", "--score", "leep,logme"]
    refused = CliRunner().invoke(cli, flags)
    assert refused.exit_code == 2 and "--score leep reads the source classifier's predictions: add --logits" in \
        refused.output
    swept = CliRunner().invoke(cli, [*flags, "--logits", "--dtype", "float32"])
    assert swept.exit_code == 0, swept.output
    scores = pd.read_csv(next((tmp_path / "runs" / "sweeps").glob("[!.]*")) / "scores.csv")
    assert sorted(scores[scores["score"] == "leep"]["taps"]) == ["rank_a:logits"]
    assert sorted(scores[scores["score"] == "logme"]["taps"]) == ["rank_a:stage1", "rank_a:stage2", "rank_a:stage3"]
    assert scores[scores["score"] == "leep"]["value"].iloc[0] == pytest.approx(table.loc["logits", "leep"], rel=1e-6)

    headless = dataclasses.replace(TINY, name="rank_headless", build=lambda w: torch.nn.Sequential(TinyNet().stem))
    with pytest.raises(FeatcacheError, match="rank_headless has no source classifier .*LEEP and NCE need one"):
        with_logits(headless)


def test_a_failed_model_is_tried_again_and_every_model_failing_is_an_error(tmp_path, monkeypatch):
    import featcache.ranking.run as run

    real, calls = run._scored, []

    def fails_first(request, name, *args):
        calls.append(name)
        if calls.count(name) == 1:
            raise FeatcacheError("cannot write in folder /nowhere: choose another --cache-dir")
        return real(request, name, *args)

    monkeypatch.setattr(run, "_scored", fails_first)
    args = ["rank", "--backbone", "rank_a", "--backbone", "rank_b", *ARGS, "--score", "hscore", "--cache-dir",
            str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs")]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 1 and "every model failed (2;" in first.output and "/nowhere" in first.output
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "resuming" not in again.output, again.output
    assert calls == ["rank_a", "rank_b", "rank_a", "rank_b"]
    [folder] = (tmp_path / "runs" / "ranks").glob("[!.]*")
    assert set(pd.read_csv(folder / "table.csv")["status"]) == {"ok"}


def test_a_ranking_is_keyed_by_the_data_so_changed_labels_are_ranked_anew(tmp_path):
    import source_fixtures as fx

    items = fx.sample_images(per_class=6)
    manifest = fx.as_manifest(tmp_path / "m.csv", fx.as_folder(tmp_path / "f", items), items)
    args = ["rank", "--backbone", "rank_a", "--data-dir", str(manifest), *ARGS[4:], "--score", "hscore",
            "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs")]
    assert CliRunner().invoke(cli, args).exit_code == 0
    manifest.write_text(manifest.read_text().replace(",ant,", ",bee,", 2))  # two labels changed
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "resuming" not in again.output, again.output
    assert len(list((tmp_path / "runs" / "ranks").glob("[!.]*"))) == 2


def test_offline_a_model_without_cached_weights_is_one_line_and_nothing_is_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache of torchvision's weights
    result = CliRunner().invoke(cli, ["rank", "--backbone", "resnet18", *ARGS[:4], "--image-size", "32", "-q",
                                      "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 1 and "Downloading" not in result.output and "Traceback" not in result.output
    assert "resnet18: the imagenet weights of resnet18 are not cached locally" in result.output
    assert "nothing is downloaded without --download" in result.output
    assert not (tmp_path / "torch" / "hub" / "checkpoints").exists() or \
        not list((tmp_path / "torch" / "hub" / "checkpoints").iterdir())


def test_a_rank_table_in_a_pipeline_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.toml").write_text('[pipeline]\nname = "p"\n[defaults]\nweights = "random"\nimage-size = 32\n'
                                     'device = "cpu"\nlimit-train = 120\nlimit-test = 40\n'
                                     '[[rank]]\nbackbone = ["rank_a", "rank_b"]\nscore = "hscore"\n')
    result = CliRunner().invoke(cli, ["run", "p.toml"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "runs" / "p" / "ranks").glob("[!.]*/table.csv"))) == 1


def test_sfda_ncti_and_etran_in_rank_and_sweep_combine_over_their_tables(tmp_path):
    """A score with parts is stored as its parts and combined over the table's taps (NCTI, ETran), in rank's
    table and the sweep's scores.csv alike; the sweep's combinations of one tap score as rank scores that tap."""
    from featcache.sweeping.scorers import combined

    result = CliRunner().invoke(cli, ["rank", "--backbone", "rank_a", *ARGS, "--cache-dir", str(tmp_path / "cache"),
                                      "--runs-dir", str(tmp_path / "runs"), "--score", "sfda,ncti,etran"])
    assert result.exit_code == 0, result.output
    [folder] = (tmp_path / "runs" / "ranks").glob("[!.]*")
    table = pd.read_csv(folder / "table.csv")
    ok = table[table["status"] == "ok"]
    assert ok[["sfda", "ncti", "etran"]].notna().all().all() and ok["sfda"].between(0, 1).all()
    rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]
    parts = [t["scores"]["ncti"] for r in rows if r["status"] == "ok" for t in r["taps"]]
    assert all(len(p) == 3 for p in parts)
    assert np.allclose(sorted(ok["ncti"]), sorted(combined("ncti", parts)))
    sweep = CliRunner().invoke(cli, ["sweep", "--backbone", "rank_a", *[a for a in ARGS if a not in ("--num-workers",
                                                                                                      "0")],
                                     "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"),
                                     "--head", "none", "--score", "sfda,ncti"])
    assert sweep.exit_code == 0, sweep.output
    scores = pd.read_csv(next((tmp_path / "runs" / "sweeps").glob("[!.]*")) / "scores.csv")
    mine = scores[(scores["score"] == "sfda") & (scores["n_taps"] == 1)].set_index("taps")["value"]
    ranked = ok.assign(taps="rank_a:" + ok["tap"]).set_index("taps")["sfda"]
    assert np.allclose(mine.sort_index(), ranked.sort_index(), rtol=1e-6)
    assert scores[scores["score"] == "ncti"]["value"].notna().all()


def test_under_memory_a_tap_is_scored_from_rows_streamed_in_few_row_chunks_to_the_same_scores(tmp_path, monkeypatch):
    """--memory below a tap's rows: its normaliser is fitted and its Gram summed from the cache, 4 rows at a time
    (many chunks), to LogME and H-scores equal to the in-memory ones to 1e-6; what cannot be streamed is one line."""
    import featcache.ranking.run as run
    import featcache.sweeping.moments as moments

    def ranked(folder, *extra):
        result = CliRunner().invoke(cli, ["rank", "--backbone", "rank_a", *ARGS, "--cache-dir", str(tmp_path / "c"),
                                          "--runs-dir", str(tmp_path / folder), "--score", "logme,hscore,hscore_reg",
                                          *extra])
        assert result.exit_code == 0, result.output
        [path] = (tmp_path / folder / "ranks").glob("[!.]*/table.csv")
        return pd.read_csv(path).set_index("tap")

    whole = ranked("whole")
    reads, real = [], moments._gram_moments

    def counted(parts, *args):
        reads.append(getattr(parts[0], "streamed", False))
        return real(parts, *args)

    monkeypatch.setattr(run, "STREAM_ROWS", 4)
    monkeypatch.setattr(moments, "_gram_moments", counted)
    streamed = ranked("streamed", "--memory", "10k")  # 135 fit rows x 8-16 columns: at least 13 KB in memory
    assert reads == [True] * 3  # every tap streamed
    for score in ("logme", "hscore", "hscore_reg"):
        np.testing.assert_allclose(streamed.loc[whole.index, score], whole[score], rtol=1e-6, atol=1e-9)
    for extra, said in [(["--memory", "1k"], "--memory 1.0 KiB is less than scoring rank_a:stage"),
                        (["--memory", "10k", "--score", "nleep"], "--score nleep reads every row of a tap at once"),
                        (["--memory", "lots"], "--memory must be a size such as 4G or 500M")]:
        result = CliRunner().invoke(cli, ["rank", "--backbone", "rank_a", *ARGS, "--cache-dir", str(tmp_path / "c"),
                                          "--runs-dir", str(tmp_path / "bad"), *extra])
        assert result.exit_code == 2 and said in result.output, result.output
