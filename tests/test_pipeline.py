"""`featcache run PIPELINE`: declarative studies, stage by stage, reusing what exists."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from featcache.cli import cli
from featcache.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parent.parent
TINY = """
[pipeline]
name = "tiny"
reproduces = "a test"

[defaults]
dataset = "digits"
limit-train = 120
limit-test = 40
weights = "random"
image-size = 32
dtype = "float32"
device = "cpu"
cache-dir = "{tmp}/cache"
quiet = true

[[extract]]
backbone = ["tiny"]

[[fuse-train]]
backbone = ["tiny"]
taps = ["late", "early,late"]
head = ["{head}"]

[[finetune]]
backbone = ["tiny"]
taps = "late"
hidden = "16"
epochs = 1
num-workers = 0

[report]
gradcam-images = 1
grid-images = 4
"""


def write(tmp_path, text, name="p.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def run(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


def statuses(output):
    """The summary's stage -> ran/reused."""
    import re

    return {f"{m[1]}#{m[2]}": m[3] for m in re.finditer(r"^(\S+) #(\d+) +(ran|reused) ", output, re.M)}


def test_pipeline_runs_every_stage_then_reuses_what_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, TINY.format(tmp=tmp_path, head="logreg"))
    first = run(path)
    assert first.exit_code == 0, first.output
    assert statuses(first.output) == {"extract#1": "ran", "fuse-train#1": "ran", "finetune#1": "ran",
                                      "report#1": "ran"}
    assert "4 stages ran, 0 reused" in first.output
    runs = sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir() if p.is_dir())
    assert len(runs) == 3  # two fusions x logreg, one fine-tune
    page = (tmp_path / "reports" / "tiny.html").read_text()
    assert all(name in page for name in runs) and (tmp_path / "reports" / "tiny.csv").exists()

    again = run(path)
    assert statuses(again.output) == {"extract#1": "reused", "fuse-train#1": "reused", "finetune#1": "reused",
                                      "report#1": "ran"}
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir() if p.is_dir()) == runs

    changed = run(write(tmp_path, TINY.format(tmp=tmp_path, head="mlp")))
    assert statuses(changed.output)["fuse-train#1"] == "ran"
    assert statuses(changed.output)["finetune#1"] == "reused"


@pytest.mark.parametrize("edit, message", [
    (("epochs = 1", "epoch = 1"), r"p.toml: \[\[finetune\]\] #1: unknown key 'epoch'; did you mean 'epochs'\?"),
    (("[[fuse-train]]", "[[fuse_train]]"), r"p.toml: \[fuse_train\]: unknown section; did you mean \[fuse-train\]\?"),
    (("[pipeline]\nname = \"tiny\"", "[info]\nname = \"tiny\""), r"\[info\]: unknown section"),
    (("name = \"tiny\"", "title = \"tiny\""), r"\[pipeline\]: unknown key 'title'"),
    (("epochs = 1", "epochs = \"six\""), r"\[\[finetune\]\] #1 epochs: Invalid value for '--epochs': 'six' is not a valid integer"),
    (("quiet = true", "quiet = \"yes\""), r"\[\[extract\]\] #1: quiet is a switch: true or false. Got 'yes' instead"),
    (("hidden = \"16\"", "hidden = [16, 8]"), r"\[\[finetune\]\] #1: hidden takes one value. Got a list of 2 instead"),
    (("image-size = 32", "image-size = {a = 1}"), r"\[defaults\]|image-size takes a number or a string"),
    (("limit-test = 40", "limit-tset = 40"), r"\[defaults\]: unknown key 'limit-tset'; did you mean 'limit-test'\?"),
    (("taps = \"late\"", "taps = \"late\"\n[[finetune]]\nunfreeze = \"last-two\""),
     r"p.toml: \[\[finetune\]\] #2: The '--unfreeze' option must be none, last-block, last-N"),
])
def test_bad_pipeline_files_name_the_file_and_key(tmp_path, edit, message):
    text = TINY.format(tmp=tmp_path, head="logreg")
    assert edit[0] in text
    result = run(write(tmp_path, text.replace(edit[0], edit[1], 1)))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    import re

    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("text, message", [
    ("[defaults]\ndataset = 'digits'\n[[extract]]\n", r"\[pipeline\]: missing section"),
    ("[pipeline]\nreproduces = 'x'\n[[extract]]\n", r"\[pipeline\]: missing key 'name'"),
    ("[pipeline]\nname = 'x'\n", r"stages: none found"),
    ("[pipeline\nname = 'x'", r"not valid TOML"),
    ("report = 'yes'\n[pipeline]\nname = 'x'\n", r"\[report\]: must be a table. Got str instead"),
    ("extract = [1]\n[pipeline]\nname = 'x'\n", r"\[extract\]: must be a table or an array of tables"),
])
def test_missing_sections_and_broken_toml(tmp_path, text, message):
    import re

    result = run(write(tmp_path, text))
    assert result.exit_code == 2
    assert re.search(message, result.output) and len(result.output.strip().splitlines()) == 1, result.output


def test_missing_file_is_one_line():
    result = run("/no/such/pipeline.toml")
    assert result.exit_code == 2 and "no pipeline file /no/such/pipeline.toml" in result.output


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_pipeline_parses_and_says_what_it_reproduces(path):
    pipeline = load_pipeline(path)
    head = tomllib.loads(path.read_text())["pipeline"]
    assert head.get("reproduces") and head.get("reported")
    assert pipeline.stages and pipeline.stages[-1].kind == "report"


def test_quickstart_runs_offline_end_to_end(tmp_path):
    """The README's demo: every stage on digits with random weights, in a fresh folder, no network."""
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch-home"), "NO_PROXY": "*",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-m", "featcache", "run", str(ROOT / "pipelines" / "quickstart.toml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 stages ran, 0 reused" in done.stdout
    page = (tmp_path / "reports" / "quickstart.html").read_text()
    assert "Backbone weights are random" in page
    assert page.count('<figure class="gradcam">') >= 6 and page.count('<figure class="curves">') >= 4


def test_changed_photos_retrain_even_with_the_same_options(tmp_path, monkeypatch, image_folder):
    monkeypatch.chdir(tmp_path)
    from PIL import Image

    path = write(tmp_path, f"""
[pipeline]
name = "photos"
reproduces = "a test"
[defaults]
dataset = "folder"
data-dir = "{image_folder}"
test-fraction = 0.34
weights = "random"
image-size = 32
device = "cpu"
backbone = ["tiny"]
[[extract]]
quiet = true
num-workers = 0
[[fuse-train]]
head = ["logreg"]
""")
    assert statuses(run(path).output) == {"extract#1": "ran", "fuse-train#1": "ran"}
    assert statuses(run(path).output) == {"extract#1": "reused", "fuse-train#1": "reused"}
    Image.new("RGB", (40, 30), (200, 200, 200)).save(image_folder / "dog" / "dog_new.png")
    assert statuses(run(path).output) == {"extract#1": "ran", "fuse-train#1": "ran"}
