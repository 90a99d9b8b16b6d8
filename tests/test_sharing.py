"""Safe to share: a run folder or pipeline file from someone else runs none of their code."""

import shutil

import joblib
import pytest
from click.testing import CliRunner
from conftest import write_image_folder

from featcache.cli.commands import cli
from featcache.fuse.saved import load_head


class Planted:
    """Unpickling this creates a file: what a stranger's pickle could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def legacy(run, tmp_path, payload):
    """A copy of ``run`` in featcache 0.1's format (head.joblib), holding ``payload``."""
    copy = shutil.copytree(run, tmp_path / "runs" / run.name)
    for name in ("normalizer.safetensors", "head.skops", "head.safetensors", "head.json", "model.safetensors"):
        (copy / name).unlink(missing_ok=True)
    joblib.dump(payload, copy / "head.joblib")
    return copy


@pytest.fixture
def frozen(report_runs):
    _, runs = report_runs
    return next(r for r in runs if "logreg" in r.name and "+" not in r.name)


def test_a_planted_pickle_is_never_loaded(frozen, tmp_path):
    marker = tmp_path / "ran"
    run = legacy(frozen, tmp_path, {"normalizer": Planted(marker), "head": Planted(marker)})
    photos = write_image_folder(tmp_path / "photos", per_class=1)
    commands = {
        "predict": ["predict", "--run", str(run), str(photos), "--device", "cpu"],
        "report": ["report", "--runs-dir", str(tmp_path / "runs"), "-o", str(tmp_path / "r.html")],
        "finetune --init-head": ["finetune", "--backbone", "tiny", "--weights", "random", "--image-size", "32",
                                 "--taps", "late", "--head", "linear", "--init-head", str(run), "--device", "cpu",
                                 "--limit-train", "200", "--limit-test", "60", "--runs-dir", str(tmp_path / "ft")],
    }
    said = "stores its head as pickles (head.joblib), which can run code when loaded: pass --trust-pickles"
    for name, args in commands.items():
        result = CliRunner().invoke(cli, args)
        assert not marker.exists(), f"{name} ran the planted pickle"
        assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
        if name == "report":  # the page is written; the run's Grad-CAM says why it is missing
            assert result.exit_code == 0 and said in (tmp_path / "r.html").read_text(), result.output
        else:
            assert result.exit_code == 2 and said in result.output and result.output.count("\n") <= 2, (name, result.output)


def test_an_old_run_folder_loads_when_trusted(frozen, tmp_path):
    normalizer, head = load_head(frozen)
    run = legacy(frozen, tmp_path, {"normalizer": normalizer, "head": head})  # what featcache 0.1 wrote
    photos = write_image_folder(tmp_path / "photos", per_class=1)
    refused = CliRunner().invoke(cli, ["predict", "--run", str(run), str(photos), "--device", "cpu"])
    trusted = CliRunner().invoke(cli, ["predict", "--run", str(run), str(photos), "--device", "cpu", "--trust-pickles"])
    fresh = CliRunner().invoke(cli, ["predict", "--run", str(frozen), str(photos), "--device", "cpu"])
    assert refused.exit_code == 2 and trusted.exit_code == 0 and trusted.output == fresh.output


def test_a_pipeline_file_cannot_trust_pickles_or_name_code(tmp_path):
    from featcache.pipeline.files import load_pipeline

    for table in ('[report]\ntrust-pickles = true\n', '[extract]\nbackbone = "!!python/object:os.system"\n',
                  '[pipeline]\nname = "x"\nmodule = "os"\n'):
        path = tmp_path / "p.toml"
        path.write_text('[pipeline]\nname = "x"\n' * (not table.startswith("[pipeline]")) + table)
        with pytest.raises(Exception) as caught:
            pipeline = load_pipeline(path)
            [stage.request.config() for stage in pipeline.stages]
        assert type(caught.value).__name__ == "FeatcacheError", table
