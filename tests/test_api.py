"""The Python API drives the stages as the commands do: same flags, same configs, same caches, same errors."""

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import featcache
from featcache.cli.commands import cli
from featcache.extraction.reader import FeatureCache


@pytest.fixture
def flags(tmp_path):
    return dict(backbone="tiny", weights="random", image_size=32, limit_train=120, limit_test=40, device="cpu",
                cache_dir=tmp_path / "cache")


def test_extract_returns_the_cache_the_command_writes(tmp_path, flags):
    path = featcache.extract(**flags, batch_size=16, num_workers=0, quiet=True)
    result = CliRunner().invoke(cli, ["extract", "--backbone", "tiny", "--weights", "random", "--image-size", "32",
                                      "--limit-train", "120", "--limit-test", "40", "--device", "cpu",
                                      "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert result.exit_code == 0 and f"already cached at {path}" in result.output  # the very same request
    both = featcache.extract(**{**flags, "backbone": ["tiny", "tiny2"]}, num_workers=0, quiet=True)
    assert both[0] == path and both[1].name.startswith("tiny2-")


def test_load_features_is_the_fused_matrix_of_the_cache(flags):
    path = featcache.extract(**flags, num_workers=0, quiet=True)
    X, y, classes = featcache.load_features(**flags, taps=["early", "late"], split="test")
    with FeatureCache(path) as cache:
        expected = np.concatenate([cache.read("test", "stage1"), cache.read("test", "stage3")], axis=1)
        assert np.array_equal(X, expected.astype(np.float32)) and np.array_equal(y, cache.labels("test"))
    assert X.shape == (40, 8 + 16) and X.dtype == np.float32 and classes == [str(d) for d in range(10)]


def test_fuse_train_finetune_runs_and_report_return_what_they_wrote(tmp_path, flags):
    runs_dir = tmp_path / "runs"
    frozen = featcache.fuse_train(**flags, taps=["late", "early,late"], head="logreg", runs_dir=runs_dir,
                                  extract=True)
    tuned = featcache.finetune(**flags, taps="late", hidden="16", epochs=1, batch_size=32, num_workers=0,
                               runs_dir=runs_dir, quiet=True)
    table = featcache.runs_table(runs_dir)
    assert isinstance(table, pd.DataFrame) and sorted(table["run"]) == sorted(p.name for p in [*frozen, tuned])
    assert featcache.runs(runs_dir).equals(table)  # the command's name: featcache runs
    page = featcache.report(runs_dir=runs_dir, out=tmp_path / "r.html", gradcam_images=0, quiet=True)
    assert page == tmp_path / "r.html" and page.is_file() and page.with_suffix(".csv").is_file()
    # what one call returns, the next takes: a run folder as a Path; rows come back as a DataFrame
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(tmp_path / "x.png")
    predicted = featcache.predict(run=frozen[0], images=[tmp_path / "x.png"], device="cpu", quiet=True, top_k=2)
    assert isinstance(predicted, pd.DataFrame) and list(predicted.columns) == ["file", "rank", "label", "probability"]
    assert list(predicted["rank"]) == [1, 2] and predicted["probability"].is_monotonic_decreasing
    with pytest.raises(featcache.FeatcacheError, match=r"did you mean " + frozen[0].name[:-2]):
        featcache.predict(run=frozen[0].name[:-1] + "x", images=[tmp_path / "x.png"], runs_dir=runs_dir)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"imagesize": 32}, r"^unknown keyword 'imagesize'; did you mean 'image_size'\?"),
    ({"image_size": "big"}, r"^Invalid value for 'image_size': 'big' is not a valid integer"),
    ({"mean": (0.5, 0.5)}, r"^Invalid value for 'mean': \(0.5, 0.5\) is not 3 comma-separated numbers"),
    ({"pooling": "maxx"}, r"^The 'pooling' option must be one of \{avg, avgmax, cls, cls\+avg, max\}. Got 'maxx' instead; "
                          r"did you mean 'max'\?"),
    ({"limit_train": 0}, r"^limit_train must be a positive number of images. Got 0 instead."),
    ({"batch_size": 0}, r"^batch_size must be at least 1. Got 0 instead."),  # the stage's own check, respelled
    ({"backbone": "resnt18"}, r"unknown backbone 'resnt18'.*did you mean 'resnet18'"),
])
def test_bad_arguments_name_the_keyword_and_the_value_passed(tmp_path, kwargs, message):
    with pytest.raises(featcache.FeatcacheError, match=message):
        featcache.extract(weights="random", cache_dir=tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # nothing written


def test_typed_values_make_the_request_the_command_line_makes(tmp_path, flags):
    """mean=(0.5, 0.5, 0.5) and --mean 0.5,0.5,0.5 are one request: the same cache file."""
    path = featcache.extract(**flags, mean=(0.5, 0.5, 0.5), std=[0.25, 0.25, 0.25], num_workers=0, quiet=True)
    result = CliRunner().invoke(cli, ["extract", "--backbone", "tiny", "--weights", "random", "--image-size", "32",
                                      "--limit-train", "120", "--limit-test", "40", "--device", "cpu",
                                      "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
                                      "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert result.exit_code == 0 and f"already cached at {path}" in result.output


def test_quiet_prints_nothing_and_dir_lists_the_stages(tmp_path, flags, capsys):
    featcache.extract(**flags, num_workers=0, quiet=True)
    featcache.fuse_train(**flags, head=("logreg",), runs_dir=tmp_path / "runs", quiet=True)
    assert capsys.readouterr().out == ""
    assert {"extract", "fuse_train", "sweep", "finetune", "predict", "report", "runs_table", "load_features",
            "run_pipeline"} <= set(dir(featcache))
    import inspect

    assert "image_size" in inspect.signature(featcache.extract).parameters
    assert "image_size: Input size in pixels" in featcache.extract.__doc__


def test_a_typo_of_load_features_own_keywords_suggests_them(flags):
    with pytest.raises(featcache.FeatcacheError, match=r"^unknown keyword 'splitt'; did you mean 'split'\?"):
        featcache.load_features(**flags, splitt="test")


def test_the_listing_commands_are_functions_of_the_same_name():
    """featcache backbones, featcache datasets and featcache runs, from Python: DataFrames; featcache.runs and
    featcache.backbones are still the subpackages (their modules import as before)."""
    import featcache.runs.records  # noqa: F401

    listed = featcache.backbones("mobilenet_v*", sizes=True)
    assert list(listed["backbone"]) == ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"]
    assert list(listed["params"]) == [3504872, 5483032, 2542856] and set(listed["input"]) == {224}
    sources = featcache.datasets()
    assert {"digits", "folder", "manifest", "webdataset", "hf", "cifar10"} <= set(sources["dataset"])
    assert callable(featcache.runs) and featcache.runs.records.RECORD == "record.json"
