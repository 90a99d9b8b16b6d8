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
    X, y = featcache.load_features(**flags, taps="early,late", split="test")
    with FeatureCache(path) as cache:
        expected = np.concatenate([cache.read("test", "stage1"), cache.read("test", "stage3")], axis=1)
        assert np.array_equal(X, expected.astype(np.float32)) and np.array_equal(y, cache.labels("test"))
    assert X.shape == (40, 8 + 16) and X.dtype == np.float32


def test_fuse_train_finetune_runs_and_report_return_what_they_wrote(tmp_path, flags):
    runs_dir = tmp_path / "runs"
    frozen = featcache.fuse_train(**flags, taps=["late", "early,late"], head="logreg", runs_dir=runs_dir,
                                  extract=True)
    tuned = featcache.finetune(**flags, taps="late", hidden="16", epochs=1, batch_size=32, num_workers=0,
                               runs_dir=runs_dir, quiet=True)
    table = featcache.runs(runs_dir)
    assert isinstance(table, pd.DataFrame) and sorted(table["run"]) == sorted(p.name for p in [*frozen, tuned])
    page = featcache.report(runs_dir=runs_dir, out=tmp_path / "r.html", gradcam_images=0)
    assert page == tmp_path / "r.html" and page.is_file() and page.with_suffix(".csv").is_file()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"imagesize": 32}, r"The 'extract\(\) keyword' option must be one of .*Got 'imagesize' instead; did you mean 'image_size'\?"),
    ({"image_size": "big"}, r"Invalid value for '--image-size': 'big' is not a valid integer"),
    ({"backbone": "resnt18"}, r"unknown backbone 'resnt18'.*did you mean 'resnet18'"),
])
def test_bad_arguments_raise_the_commands_one_line_error(tmp_path, kwargs, message):
    with pytest.raises(featcache.FeatcacheError, match=message):
        featcache.extract(weights="random", cache_dir=tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # nothing written
