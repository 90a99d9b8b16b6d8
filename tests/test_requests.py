"""One request per stage: the command line, pipeline files and the Python API are made from its fields.

Every field of every request is walked: its flag, its pipeline key and its API keyword exist and
give the same request for the same value. Plug-ins (a head, a scorer, a dataset source) are one
registry entry, registered inside a test, and show up in the commands that offer them.
"""

import dataclasses
import typing
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featcache.cli.commands import cli
from featcache.cli.generate import request_command
from featcache.errors import FeatcacheError
from featcache.pipeline.files import PIPELINE_STAGES, keys
from featcache.pipeline.request import PipelineRequest
from featcache.pipeline.stages import STAGES
from featcache.requests import API, PIPELINE, base_type, build, params

REQUESTS = {**{name: spec.request for name, spec in STAGES.items()}, "run": PipelineRequest}
FIELDS = [(name, p) for name, cls in REQUESTS.items() for p in params(cls)]
TEXT = {"weights": "random", "combos": "singles", "unfreeze": "all", "title": "t", "pipeline": "p", "run": "r",
        "keep_caches": "top-2", "hf_splits": "train=training,test=evaluation", "budget": "90s", "memory": "4G"}


def sample(p):
    """A valid value of the field other than its default, as the API takes it."""
    hint = base_type(p.hint)
    choices = p.choices
    if hint is bool:
        return True
    if hint is int:
        return 3 if p.default != 3 else 4
    if hint is float:
        return 0.3
    if hint is Path:
        return Path("somewhere")
    if hint is str:
        return next(c for c in choices if c != p.default) if choices else TEXT.get(p.name, "early")
    kind, *rest = typing.get_args(hint)
    if kind is str:
        if choices:
            return tuple(c for c in choices if c not in (p.default or ()))[:2]
        return ("layer3.1", "late") if p.meta.split else ("early,late", "late")  # a split field: no commas inside
    if rest == [...]:
        return (1, 2) if kind is int else (0.5, 1.0)
    return (0.5, 0.5, 0.5)


def cli_args(p, value) -> list[str]:
    if p.meta.argument:
        return list(value) if isinstance(value, tuple) else [str(value)]
    flag = f"--{p.flag}"
    if isinstance(value, bool):
        return [flag]
    if p.multiple:
        return [a for v in value for a in (flag, v)]
    if isinstance(value, tuple):
        return [flag, ",".join(str(v) for v in value)]
    return [flag, str(value)]


def required(cls) -> dict:
    return {p.name: sample(p) for p in params(cls) if p.default is dataclasses.MISSING}


@pytest.mark.parametrize(("stage", "p"), FIELDS, ids=[f"{s}.{p.name}" for s, p in FIELDS])
def test_every_field_is_a_flag_a_pipeline_key_and_a_keyword_giving_one_request(stage, p):
    cls = REQUESTS[stage]
    value = sample(p)
    assert value != p.default
    base = required(cls)
    from_api = build(cls, {**base, p.name: value}, API)
    assert getattr(from_api, p.name) == value

    command = request_command(stage, cls, lambda request: request)
    args = [a for q in params(cls) if q.default is dataclasses.MISSING and q.name != p.name
            for a in cli_args(q, base[q.name])] + cli_args(p, value)
    ctx = command.make_context(stage, args)
    assert command.callback(**ctx.params) == from_api

    if p.meta.shared and stage in PIPELINE_STAGES:
        key = p.flag
        assert key in keys(stage)
        toml = list(value) if isinstance(value, tuple) else str(value) if isinstance(value, Path) else value
        assert build(cls, {**base, p.name: toml}, PIPELINE) == from_api
    elif stage in PIPELINE_STAGES:
        assert p.flag not in keys(stage)  # a shared file cannot set it


def test_one_request_gives_the_pinned_fingerprint_from_every_front():
    """The request the command line, the API and a pipeline make is the one tests/test_fingerprint.py pins."""
    from featcache.backbones.registry import BACKBONES
    from featcache.extraction.config import fingerprint
    from featcache.extraction.request import ExtractRequest
    from featcache.extraction.store import fingerprint_hash

    values = dict(backbone=("resnet18",), weights="random", image_size=64, limit_train=100, limit_test=20)
    api = build(ExtractRequest, values, API)
    command = request_command("extract", ExtractRequest, lambda request: request)
    ctx = command.make_context("extract", ["--backbone", "resnet18", "--weights", "random", "--image-size", "64",
                                           "--limit-train", "100", "--limit-test", "20"])
    toml = build(ExtractRequest, {"backbone": ["resnet18"], "weights": "random", "image_size": 64,
                                  "limit_train": 100, "limit_test": 20}, PIPELINE)
    assert command.callback(**ctx.params) == api == toml
    got = fingerprint_hash(fingerprint(api.config(), BACKBONES["resnet18"], "fp32"))[:12]
    assert got == "c185cd15b776"  # PINNED[("random", "resnet18", "fp32")]


def test_the_old_flag_code_is_gone():
    package = Path(__file__).resolve().parent.parent / "featcache"
    assert not (package / "cli" / "flags.py").exists() and not (package / "cli" / "options.py").exists()
    import featcache.api

    assert "click" not in featcache.api.__dict__ and "cli" not in Path(featcache.api.__file__).read_text()


# --- plug-ins: one registry entry each, registered inside the test ------------------------------


FAST = ["--backbone", "tiny", "--weights", "random", "--image-size", "32", "--device", "cpu", "--limit-train", "120",
        "--limit-test", "40", "-q"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_a_head_registered_in_a_test_is_offered_by_the_commands_that_take_it(tmp_path, monkeypatch):
    from featcache.fuse.heads import HEADS, HeadEntry

    def make(options, var_smoothing=1e-9):
        from sklearn.naive_bayes import GaussianNB

        return GaussianNB(var_smoothing=var_smoothing)

    entry = HeadEntry(make, lambda options, n: [{"var_smoothing": v} for v in (1e-9, 1e-3)],
                      help="Gaussian naive Bayes (a toy head)")
    monkeypatch.setitem(HEADS, "toynb", entry)
    assert "toynb: Gaussian naive Bayes" in " ".join(invoke("fuse-train", "--help").output.split())
    assert "toynb" in invoke("sweep", "--help").output
    assert "toynb" not in invoke("finetune", "--help").output
    runs = tmp_path / "runs"
    trained = invoke("fuse-train", *FAST, "--head", "toynb", "--extract", "--cache-dir", tmp_path / "cache",
                     "--runs-dir", runs)
    assert trained.exit_code == 0, trained.output
    [run] = [p for p in runs.glob("[!.]*") if p.is_dir()]
    assert "toynb" in run.name and (run / "head.skops").is_file()
    swept = invoke("sweep", *FAST, "--head", "toynb,logreg", "--combos", "singles", "--keep", "0",
                   "--cache-dir", tmp_path / "cache", "--runs-dir", runs)
    assert swept.exit_code == 0, swept.output
    import pandas as pd

    [folder] = (runs / "sweeps").glob("[!.]*")
    table = pd.read_csv(folder / "table.csv")
    assert set(table["head"]) == {"toynb", "logreg"} and len(table) == 6
    refused = invoke("finetune", *FAST, "--head", "toynb", "--cache-dir", tmp_path / "cache", "--runs-dir", runs)
    assert refused.exit_code == 2 and "The '--head' option must be one of {linear, mlp, resblocks}" in refused.output


def test_a_dataset_source_registered_in_a_test_extracts_through_the_cli_and_the_api(tmp_path, monkeypatch):
    import featcache
    from featcache.data.datasets import DATASETS, Dataset, DatasetEntry, Split

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (60, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(60) % 3

    def load(request):
        splits = {name: Split(labels=labels[rows], index=rows, images=images[rows])
                  for name, rows in (("train", np.arange(45)), ("test", np.arange(45, 60)))}
        return Dataset("toyarrays", ("a", "b", "c"), splits)

    monkeypatch.setitem(DATASETS, "toyarrays", DatasetEntry(key=lambda r: "toyarrays",
                                                            identity=lambda r: {"arrays": "toy v1"}, load=load))
    assert "toyarrays" in " ".join(invoke("extract", "--help").output.split())
    flags = ["--dataset", "toyarrays", "--backbone", "tiny", "--weights", "random", "--image-size", "32",
             "--device", "cpu", "--cache-dir", tmp_path / "cache", "-q"]
    result = invoke("extract", *flags)
    assert result.exit_code == 0, result.output
    path = featcache.extract(dataset="toyarrays", backbone=["tiny"], weights="random", image_size=32, device="cpu",
                             cache_dir=tmp_path / "cache", quiet=True)
    assert path.parent.name == "toyarrays" and f"{path.name}" in result.output  # the same cache, served
    X, y, classes = featcache.load_features(dataset="toyarrays", backbone=["tiny"], weights="random", image_size=32,
                                            device="cpu", cache_dir=tmp_path / "cache", split="test")
    assert X.shape == (15, 16) and list(y) == list(labels[45:]) and classes == ["a", "b", "c"]


def test_an_unknown_name_from_any_front_lists_the_registry(tmp_path):
    from featcache.data.datasets import DATASETS

    every = ", ".join(sorted(DATASETS))
    with pytest.raises(FeatcacheError, match=r"The 'dataset' option must be one of \{caltech101, .*digits, .*\}"):
        build(REQUESTS["extract"], {"dataset": "cifar11"}, API)
    result = invoke("extract", "--dataset", "cifar11", "--cache-dir", tmp_path)
    assert result.exit_code == 2 and f"'--dataset' option must be one of {{{every}}}. Got 'cifar11' " \
                                      "instead; did you mean 'cifar10'?" in " ".join(result.output.split())


def test_a_scorer_registered_in_a_test_scores_every_combination_of_the_sweep(tmp_path, monkeypatch):
    import pandas as pd

    from featcache.sweeping.scorers import SCORERS, Scorer

    monkeypatch.setitem(SCORERS, "toywidth", Scorer(lambda X, y, k: float(X.shape[1]), "the width (a toy score)"))
    assert "toywidth: the width" in " ".join(invoke("sweep", "--help").output.split())
    runs = tmp_path / "runs"
    flags = [*FAST, "--head", "logreg", "--combos", "pairs", "--keep", "0", "--seeds", "0,1", "--extract",
             "--cache-dir", tmp_path / "cache", "--runs-dir", runs]
    result = invoke("sweep", *flags, "--score", "toywidth,hscore")
    assert result.exit_code == 0, result.output
    assert "toywidth: the best 5 of 6 combinations by this score" in result.output
    [folder] = (runs / "sweeps").glob("[!.]*")
    scores = pd.read_csv(folder / "scores.csv")
    widths = scores[scores["score"] == "toywidth"]
    assert len(widths) == 6 and (widths["value"] == widths["width"]).all() and (widths["seeds"] == 2).all()
    assert list(widths["value"]) == sorted(widths["value"], reverse=True)  # larger is better: best first
    assert len(pd.read_csv(folder / "table.csv")) == 6  # the probes' table holds no score rows
    rows = [line for line in (folder / "rows.jsonl").read_text().splitlines() if '"kind": "score"' in line]
    assert len(rows) == 2 * 6 * 2  # two scores x six combinations x two seeds, each once
    again = invoke("sweep", *flags, "--score", "toywidth,hscore")
    assert "every evaluation of this sweep is in" in again.output
    bad = invoke("sweep", *flags, "--score", "logmee")
    assert bad.exit_code == 2 and ("The '--score' option must be one of {etran, hscore, hscore_reg, leep, logme, nce, "
                                   "ncti, nleep, sfda, toywidth}. Got 'logmee' instead; did you mean 'logme'?") in bad.output
