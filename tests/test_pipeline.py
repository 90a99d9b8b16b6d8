"""`featcache run PIPELINE`: declarative studies, stage by stage, reusing what exists."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from featcache.cli.commands import cli
from featcache.pipeline.files import load_pipeline

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
cache-dir = "cache"  # relative: a pipeline file writes only below the folder it runs in
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
gradcam-images = 0
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
    runs = sorted(p.name for p in (tmp_path / "runs" / "tiny").glob("[!.]*") if p.is_dir())
    assert len(runs) == 3  # two fusions x logreg, one fine-tune
    page = (tmp_path / "reports" / "tiny.html").read_text()
    assert all(name in page for name in runs) and (tmp_path / "reports" / "tiny.csv").exists()

    again = run(path)
    assert statuses(again.output) == {"extract#1": "reused", "fuse-train#1": "reused", "finetune#1": "reused",
                                      "report#1": "ran"}
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").glob("[!.]*") if p.is_dir()) == runs

    changed = run(write(tmp_path, TINY.format(tmp=tmp_path, head="mlp")))
    assert statuses(changed.output)["fuse-train#1"] == "ran"
    assert statuses(changed.output)["finetune#1"] == "reused"

    # An override is part of the stage's key: the trial is a new run, and never stands in for the file's own.
    trial = run(tmp_path / "p.toml", "--set", "epochs=2")
    assert "overrides: epochs=2" in trial.output
    assert statuses(trial.output) == {"extract#1": "reused", "fuse-train#1": "ran", "finetune#1": "ran",
                                      "report#1": "ran"}
    assert statuses(run(tmp_path / "p.toml").output)["finetune#1"] == "reused"  # the epochs = 1 run, still there


def test_a_sweep_stage_keeps_its_runs_for_the_report_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = TINY.format(tmp=tmp_path, head="logreg").split("[[fuse-train]]")[0] + """
[[sweep]]
backbone = ["tiny"]
combos = "singles"
head = ["logreg,knn"]
keep = 1

[report]
gradcam-images = 0
grid-images = 4
"""
    path = write(tmp_path, text)
    first = run(path)
    assert first.exit_code == 0, first.output
    assert statuses(first.output) == {"extract#1": "ran", "sweep#1": "ran", "report#1": "ran"}
    [kept] = [p for p in (tmp_path / "runs" / "tiny").glob("[!.]*") if p.is_dir() and p.name != "sweeps"]
    page = (tmp_path / "reports" / "tiny.html").read_text()
    assert kept.name in page and "Sweep: tiny on digits" in page
    again = run(path)
    assert statuses(again.output) == {"extract#1": "reused", "sweep#1": "reused", "report#1": "ran"}
    assert [p for p in (tmp_path / "runs" / "tiny").glob("[!.]*") if p.is_dir() and p.name != "sweeps"] == [kept]


@pytest.mark.parametrize("edit, message", [
    (("epochs = 1", "epoch = 1"), r"p.toml: \[\[finetune\]\] #1: unknown key 'epoch'; did you mean 'epochs'\?"),
    (("[[fuse-train]]", "[[fuse_train]]"), r"p.toml: \[fuse_train\]: unknown section; did you mean \[fuse-train\]\?"),
    (("[pipeline]\nname = \"tiny\"", "[info]\nname = \"tiny\""), r"\[info\]: unknown section"),
    (("name = \"tiny\"", "title = \"tiny\""), r"\[pipeline\]: unknown key 'title'"),
    (("epochs = 1", "epochs = \"six\""), r"\[\[finetune\]\] #1: Invalid value for 'epochs': 'six' is not a valid integer"),
    (("quiet = true", "quiet = \"yes\""), r"\[\[extract\]\] #1: Invalid value for 'quiet': 'yes' is not true or false"),
    (("hidden = \"16\"", "hidden = \"wide\""), r"\[\[finetune\]\] #1: Invalid value for 'hidden': 'wide' is not comma-separated whole numbers"),
    (("image-size = 32", "image-size = {a = 1}"), r"#1: Invalid value for 'image-size': \{'a': 1\} is not a valid integer"),
    (("limit-test = 40", "limit-tset = 40"), r"\[defaults\]: unknown key 'limit-tset'; did you mean 'limit-test'\?"),
    (("taps = \"late\"", "taps = \"late\"\n[[finetune]]\nunfreeze = \"last-two\""),
     r"p.toml: \[\[finetune\]\] #2: The 'unfreeze' option must be none, last-block, last-N"),
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


def _hub_cache_with(tmp_path, monkeypatch, repos: dict) -> None:
    """A local Hugging Face cache holding ``repos`` (ORG/NAME -> a small transformers model of that type, saved
    with its weights), what a pipeline naming hf:ORG/NAME needs to parse offline."""
    import huggingface_hub.constants

    for repo, config in repos.items():
        commit = "0" * 40
        folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
        config.save_pretrained(folder / "snapshots" / commit)
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_pipeline_parses_and_says_what_it_reproduces(path, tmp_path, monkeypatch):
    if "hf:facebook/dinov2-small" in path.read_text():  # a Hub model: its config in a local cache, as after a download
        transformers = pytest.importorskip("transformers")
        _hub_cache_with(tmp_path, monkeypatch, {"facebook/dinov2-small": transformers.Dinov2Model(
            transformers.Dinov2Config(hidden_size=16, num_hidden_layers=12, num_attention_heads=2, mlp_ratio=2,
                                      image_size=518, patch_size=14))})
    pipeline = load_pipeline(path)
    head = tomllib.loads(path.read_text())["pipeline"]
    assert head.get("reproduces") and head.get("reported")
    assert pipeline.stages and pipeline.stages[-1].kind == "report"


def test_dry_run_shows_each_stages_options_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(str(ROOT / "pipelines" / "quickstart.toml"), "--dry-run", "--set", "epochs=2")
    assert result.exit_code == 0, result.output
    stages = result.output.split("fuse-train #1\n", 1)[1].split("fuse-train #2\n", 1)[0]
    for line in ('backbone = ["resnet18", "mobilenet_v2"]', 'taps = ["late", "early,late"]', "epochs = 2",
                 'weights = "random"', 'runs-dir = "runs/quickstart"'):
        assert f"  {line}\n" in stages
    assert "patience" not in stages and "force" not in stages  # at their defaults: not listed
    swept = result.output.split("sweep #1\n", 1)[1].split("fuse-train #1\n", 1)[0]
    assert '  head = ["logreg", "knn"]\n' in swept and "  keep = 1\n" in swept and "taps" not in swept
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_quickstart_runs_offline_end_to_end(tmp_path):
    """The README's demo: every stage on digits with random weights, in a fresh folder, no network."""
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch-home"), "NO_PROXY": "*",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    # As shipped but on fewer images (the stages, heads and report are the demo's; the suite stays quick)
    done = subprocess.run([sys.executable, "-m", "featcache", "run", str(ROOT / "pipelines" / "quickstart.toml"),
                           "--set", "limit-train=120", "--set", "limit-test=40", "--set", "image-size=32",
                           "--set", "gradcam-images=1", "--set", "grid-images=0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "7 stages ran, 1 reused" in done.stdout and "extract #1    reused" in done.stdout  # choose extracted
    page = (tmp_path / "reports" / "quickstart.html").read_text()
    assert page.index('id="choice-1"') < page.index('id="comparison"')  # the answer first
    assert "Backbone weights are random" in page and "Sweep: resnet18 + mobilenet_v2 on digits" in page
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


def test_set_overrides_defaults_and_stage_tables_in_every_stage_that_takes_the_option(tmp_path):
    text = TINY.format(tmp=tmp_path, head="logreg").replace("epochs = 1", "epochs = 1\nimage_size = 48")
    pipeline = load_pipeline(write(tmp_path, text), {"image-size": 40, "epochs": 3, "runs-dir": str(tmp_path / "r")})
    sizes = {s.kind: s.request.image_size for s in pipeline.stages if hasattr(s.request, "image_size")}
    assert sizes == {"extract": 40, "fuse-train": 40, "finetune": 40}  # the finetune table said image_size = 48
    [tune] = [s for s in pipeline.stages if s.kind == "finetune"]
    assert tune.request.epochs == 3 and pipeline.runs_dir == tmp_path / "r"
    assert tune.request.config().runs_dir == tmp_path / "r"


@pytest.mark.parametrize("setting, message", [
    ("epoch=1", r"--set: unknown key 'epoch'; did you mean 'epochs'\?"),
    ("weights", r"--set takes KEY=VALUE, e.g. --set weights=random. Got 'weights' instead"),
    ("epochs=many", r"^Error: --set epochs=\.\.\.: Invalid value for 'epochs': 'many' is not a valid integer"),
])
def test_bad_set_is_one_line(tmp_path, setting, message):
    import re

    result = run(write(tmp_path, TINY.format(tmp=tmp_path, head="logreg")), "--set", setting)
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert re.search(message, line), line


def _cifar_study(tmp_path, monkeypatch):
    from cifar_fixture import use_generated_cifar10

    root = use_generated_cifar10(monkeypatch, tmp_path / "cifar", per_batch=20, n_test=30)
    return {"data-dir": root, "download": "false", "limit-train": 80, "limit-test": 20}


def _footwear(tmp_path, monkeypatch):
    from conftest import write_image_folder

    write_image_folder(tmp_path / "footwear" / "train", ("sapatos", "tsinelas"), 4)
    write_image_folder(tmp_path / "footwear" / "test", ("sapatos", "tsinelas"), 2, seed=1)
    return {"data-dir": tmp_path / "footwear", "image-size": 64}  # 32 px would make the late map 1x1


def _photos(tmp_path, monkeypatch):
    from conftest import write_image_folder

    return {"data-dir": write_image_folder(tmp_path / "photos", ("a", "b", "c"), 8), "head-epochs": 1}


def recipe(record: dict) -> tuple:
    """What a run took from its study file: kind, head, fused width, normalisation, head training, unfreezing."""
    c = record["config"]
    o = c if record["kind"] == "finetuned" else c.get("head_options")
    hidden = tuple(o["hidden"]) if record["head"] != "linear" else ()
    torch_head = (hidden, o["dropout"] if hidden else 0.0, o["optimizer"], o["lr"]) \
        if record["head"] in ("mlp", "linear", "resblocks") else ()  # dropout follows hidden layers only
    tuned = (c["unfreeze"], c["backbone_lr_scale"], c["batch_size"], c["augment"]) if record["kind"] == "finetuned" \
        else ()
    return (record["kind"], record["head"], record["dim"], c["tap_norm"], *torch_head, *tuned)


# (data set-up, the runs each study's file must produce: see pipelines/*.toml and ../shared/studies)
STUDIES = {
    "resnet18_mobilenetv2_concat": (_cifar_study, [
        ("frozen", "linear", 1792, "none", (), 0.0, "adam", 3e-4),  # 512 + 1280 -> 10, Adam 3e-4
        ("frozen", "linear", 1792, "standard", (), 0.0, "adam", 3e-4),
        ("frozen", "logreg", 1792, "standard"),
        ("frozen", "mlp", 1792, "standard", (512,), 0.2, "adam", 3e-4)]),  # featcache's extra variant
    "resnet50_mobilenetv2_four_setups": (_cifar_study, [
        ("frozen", "mlp", 3328, "standard", (512,), 0.2, "adamw", 1e-4),  # 3328 -> 512 -> ReLU -> Dropout 0.2
        ("finetuned", "mlp", 2048, "standard", (512,), 0.2, "adamw", 1e-4, "all", 1.0, 32, "basic"),
        ("finetuned", "mlp", 1280, "standard", (512,), 0.2, "adamw", 1e-4, "all", 1.0, 32, "basic"),
        ("finetuned", "mlp", 3328, "standard", (512,), 0.2, "adamw", 1e-4, "last-block", 1.0, 32, "basic")]),
    "mobilenetv2_early_late": (_cifar_study, [
        ("frozen", "linear", 32 + 1280, "none", (), 0.0, "adam", 1e-3),  # early (stride 8) + late, one FC layer
        ("frozen", "linear", 1280, "none", (), 0.0, "adam", 1e-3),
        ("frozen", "logreg", 32 + 1280, "standard"),
        ("frozen", "logreg", 1280, "standard")]),
    "mobilenetv2_vgg16_parallel": (_photos, [
        ("frozen", "mlp", 1280 + 512, "standard", (256,), 0.5, "adam", 1e-3),  # Dense 256 -> ReLU -> Dropout 0.5
        ("frozen", "mlp", 1280, "standard", (256,), 0.5, "adam", 1e-3),
        ("finetuned", "mlp", 1280 + 512, "standard", (256,), 0.5, "adam", 1e-3, "last-block", 0.1, 32, "none"),
        ("finetuned", "mlp", 1280, "standard", (256,), 0.5, "adam", 1e-3, "last-block", 0.1, 32, "none")]),
    "footwear_resblocks": (_footwear, [  # 2 residual blocks -> pool -> 512 -> Dropout 0.5 -> 2, batch size 1
        ("finetuned", "resblocks", 1280, "standard", (512,), 0.5, "adam", 1e-4, "none", 0.1, 1, "heavy")]),
}


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_every_study_pipeline_runs_end_to_end_on_small_generated_data(tmp_path, monkeypatch, study):
    """Each study's file as shipped, with --set only shrinking it: random weights, small data, one epoch.

    The real runs need ImageNet weights and the studies' data; this shows every stage of every file
    runs, and that the runs carry the study's recipe (head, widths, optimiser, unfreezing).
    """
    import json

    setup, expected = STUDIES[study]
    settings = {"weights": "random", "image-size": 32, "epochs": 1, "device": "cpu",
                "dtype": "float32", "cache-dir": tmp_path / "cache", "runs-dir": tmp_path / "runs",
                "out": tmp_path / "report.html", "quiet": "true", "num-workers": 0,
                "gradcam-images": 1 if "four_setups" in study else 0,  # Grad-CAM: the study about it (the suite's time)
                "grid-images": 4, **setup(tmp_path, monkeypatch)}
    result = run(ROOT / "pipelines" / f"{study}.toml", *(a for k, v in settings.items() for a in ("--set", f"{k}={v}")))
    assert result.exit_code == 0, result.output[-3000:]
    assert "reused" not in result.output.split("\n== ")[-1].splitlines()[-1].replace("0 reused", "")
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob("*/record.json"))]
    assert sorted(map(recipe, records), key=repr) == sorted(expected, key=repr)
    assert all(r["config"]["weights"] == "random" and r["config"]["image_size"] == settings["image-size"]
               for r in records)
    page = (tmp_path / "report.html").read_text()
    assert page.count('<section class="run"') == len(records) and "Backbone weights are random" in page


@pytest.mark.parametrize("text, parsed", [
    ("lr=1e-4", ("lr", 1e-4)), ("epochs=2", ("epochs", 2)), ("download=false", ("download", False)),
    ("weights=random", ("weights", "random")), ("taps=early,late", ("taps", "early,late")),
    ("data_dir=/tmp/x y", ("data-dir", "/tmp/x y")), ("taps=[\"late\", \"early,late\"]", ("taps", ["late", "early,late"])),
])
def test_set_values_are_read_as_toml_else_as_text(text, parsed):
    from featcache.pipeline.files import parse_override

    assert parse_override(text) == parsed


def test_the_transfer_suite_sweeps_every_dataset_and_tabulates_the_best_by_validation(tmp_path):
    """pipelines/transfer-suite.toml on small local copies of its four datasets, in their real formats."""
    import json

    import source_fixtures as fx

    data = tmp_path / "data"
    fx.cifar100(data, n_train=300, n_test=100)
    fx.flowers102(data)
    fx.dtd(data)
    fx.oxford_pets(data)
    settings = {"backbone": '["tiny"]', "weights": "random", "image-size": 32, "device": "cpu", "data-dir": data,
                "cache-dir": tmp_path / "cache", "runs-dir": tmp_path / "runs", "out": tmp_path / "report.html",
                "quiet": "true", "gradcam-images": 0, "combos": "singles", "keep": 0}  # the sweeps alone: quick
    result = run(ROOT / "pipelines" / "transfer-suite.toml", *(a for k, v in settings.items() for a in ("--set", f"{k}={v}")))
    assert result.exit_code == 0, result.output[-3000:]
    sweeps = sorted((tmp_path / "runs" / "sweeps").glob("[!.]*"))
    requests = {json.loads((s / "sweep.json").read_text())["dataset"]: json.loads((s / "sweep.json").read_text())
                for s in sweeps}
    assert sorted(requests) == ["cifar100", "dtd", "flowers102", "oxfordiiitpet"]
    assert requests["flowers102"]["validation"] == "official" and requests["cifar100"]["validation"] == "carved"
    page = (tmp_path / "report.html").read_text()
    suite = page.split('<h2 id="suite">The sweeps at a glance</h2>', 1)[1].split("</table>", 1)[0]
    for name in requests:
        assert f"<td>{name}</td>" in suite
