"""Fault injection: every kind of file featcache reads, damaged every way, read by every command that reads it.

For each file kind (a cache and its .partial, a run folder's record and model files, a sweep folder's
rows, request and table, a pipeline file) and each damage (empty, truncated, random bytes, the right
format with wrong content, the same file of another request), each command that reads it ends in a
one-line error with exit status 2 or carries on (exit 0, the damage named or mended): never a
traceback, never code run, never a huge allocation (the whole module runs under a 24 GiB address-space
limit, so an absurd allocation fails fast instead of swapping).
"""

import io
import json
import pickle
import random
import resource
import shutil
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from featcache.cli.commands import cli

FLAGS = ["--backbone", "tiny", "--weights", "random", "--image-size", "32", "--device", "cpu", "--dtype", "float32",
         "--limit-train", "120", "--limit-test", "40"]
OTHER = [*FLAGS[:-1], "30"]  # another request: --limit-test 30


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module", autouse=True)
def memory_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (24 << 30, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def make_world(root: Path, flags) -> dict:
    """A cache, three runs (a scikit-learn head, a torch head, a fine-tune), a sweep, a pipeline file."""
    cache, runs = root / "cache", root / "runs"
    for args in (["extract", *flags, "--cache-dir", cache, "-q"],
                 ["fuse-train", *flags, "--cache-dir", cache, "--runs-dir", runs, "--head", "logreg,linear"],
                 ["finetune", *flags, "--cache-dir", cache, "--runs-dir", runs, "--epochs", "1", "--hidden", "8",
                  "--num-workers", "0", "-q"],
                 ["sweep", *flags, "--cache-dir", cache, "--runs-dir", root / "swept", "--combos", "singles",
                  "--head", "logreg", "--keep", "0", "-q"]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    (root / "p.toml").write_text('[pipeline]\nname = "p"\n[defaults]\nbackbone = ["tiny"]\nweights = "random"\n'
                                 'image-size = 32\ndevice = "cpu"\nlimit-train = 120\nlimit-test = 40\n'
                                 'dtype = "float32"\n[[fuse-train]]\nhead = ["logreg"]\n')
    [h5] = cache.rglob("*.h5")
    folders = [p for p in runs.glob("[!.]*") if p.name != "sweeps"]
    [sweep] = (root / "swept" / "sweeps").glob("[!.]*")
    return {"root": root, "cache": h5, "logreg": next(p for p in folders if "logreg" in p.name),
            "linear": next(p for p in folders if "linear" in p.name and "-ft-" not in p.name),
            "finetuned": next(p for p in folders if "-ft-" in p.name), "sweep": sweep}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    base = tmp_path_factory.mktemp("fault-world")
    return make_world(base / "mine", FLAGS), make_world(base / "other", OTHER)


# kind -> (where the file is in a world, the commands that read it: each a function of the world's paths)
def cache_file(w):
    return w["cache"]


def partial_file(w):
    return w["cache"].with_name(w["cache"].name + ".partial")


KINDS = {
    "cache.h5": (cache_file, ["info", "extract", "fuse-train", "sweep"]),
    "cache.partial": (partial_file, ["info-dir", "extract"]),
    "record.json": (lambda w: w["logreg"] / "record.json", ["runs", "report:logreg", "predict:logreg", "fuse-train"]),
    "head.skops": (lambda w: w["logreg"] / "head.skops", ["predict:logreg", "report:logreg", "init-head:logreg"]),
    "head.safetensors": (lambda w: w["linear"] / "head.safetensors",
                         ["predict:linear", "report:linear", "init-head:linear"]),
    "head.json": (lambda w: w["linear"] / "head.json", ["predict:linear", "report:linear", "init-head:linear"]),
    "normalizer.safetensors": (lambda w: w["logreg"] / "normalizer.safetensors",
                               ["predict:logreg", "report:logreg"]),
    "model.safetensors": (lambda w: w["finetuned"] / "model.safetensors",
                          ["predict:finetuned", "report:finetuned"]),
    "rows.jsonl": (lambda w: w["sweep"] / "rows.jsonl", ["sweep", "report"]),
    "sweep.json": (lambda w: w["sweep"] / "sweep.json", ["report", "sweep"]),
    "table.csv": (lambda w: w["sweep"] / "table.csv", ["report", "sweep"]),
    "pipeline.toml": (lambda w: w["root"] / "p.toml", ["run-dry", "run"]),
}


def command(name: str, w: dict) -> list:
    root = w["root"]
    common = [*FLAGS, "--cache-dir", root / "cache", "--runs-dir", root / "runs"]
    name, _, run = name.partition(":")
    photo = root / "photo.png"
    if not photo.exists():
        from PIL import Image

        Image.new("RGB", (24, 24), (90, 30, 200)).save(photo)
    return {
        "info": ["info", w["cache"]],
        "info-dir": ["info", root / "cache"],
        "extract": ["extract", *FLAGS, "--cache-dir", root / "cache", "-q"],
        "fuse-train": ["fuse-train", *common, "--head", "logreg"],
        "sweep": ["sweep", *FLAGS, "--cache-dir", root / "cache", "--runs-dir", root / "swept", "--combos", "singles",
                  "--head", "logreg", "--keep", "0", "-q"],
        "runs": ["runs", "--runs-dir", root / "runs"],
        # one run's page (the damaged one's), or the sweep's folder alone: what the damage changes, drawn quickly
        "report": ["report", *([w[run]] if run else []), "--runs-dir", root / ("runs" if run else "swept"), "-o",
                   root / "r.html", "--grid-images", "0", "--gradcam-images", "1" if run else "0"],
        "predict": ["predict", "--run", w.get(run), photo, "--device", "cpu"],
        "init-head": ["finetune", *common, "--head", "linear", "--init-head", w.get(run), "--epochs", "1",
                      "--num-workers", "0", "-q"],
        "run-dry": ["run", root / "p.toml", "--dry-run"],
        "run": ["run", root / "p.toml"],
    }[name]


def damaged(kind: str, how: str, original: bytes, other: bytes) -> bytes:
    rng = random.Random(f"{kind}-{how}")
    if how == "empty":
        return b""
    if how == "truncated":
        return original[: len(original) // 2]
    if how == "random":
        return bytes(rng.randrange(256) for _ in range(max(64, min(len(original), 4096))))
    if how == "other request":
        return other
    return wrong_content(kind, original)


def wrong_content(kind: str, original: bytes) -> bytes:
    """The right format holding the wrong things: wrong shapes, wrong types, NaN."""
    if kind.endswith(".json"):
        data = json.loads(original)
        if kind == "record.json":
            return json.dumps({**data, "metrics": "high", "classes": 7, "taps": {"a": 1}}).encode()
        if kind == "head.json":
            return json.dumps({**data, "classes": "x", "params": {"hidden": 5}}).encode()
        return json.dumps({"caches": 3, "taps": [[1, 2]], "weights": None}).encode()
    if kind == "rows.jsonl":
        row = json.loads(original.splitlines()[0])
        return (json.dumps({**row, "val_acc": "NaN", "taps": 5}) + "\n" + json.dumps([1, 2]) + "\n").encode()
    if kind == "table.csv":
        return b"taps,head,val_acc\nx,logreg,not-a-number\n"
    if kind == "pipeline.toml":
        return b'[pipeline]\nname = "p"\n[[fuse-train]]\nhead = 5\nepochs = [1, 2]\n'
    if kind.endswith(".safetensors"):
        from safetensors.numpy import save

        return save({"weight": np.full((3, 2), np.nan, dtype=np.float32)}, metadata={"method": "standard",
                                                                                    "dims": "[99]"})
    if kind == "head.skops":
        import skops.io
        from sklearn.tree import DecisionTreeClassifier  # a scikit-learn model featcache never writes

        return skops.io.dumps(DecisionTreeClassifier().fit([[0], [1]], [0, 1]))
    raise AssertionError(kind)


CASES = [(kind, how) for kind in KINDS for how in ("empty", "truncated", "random", "wrong content", "other request")]


@pytest.mark.parametrize(("kind", "how"), CASES, ids=[f"{k}-{h}" for k, h in CASES])
def test_every_reader_of_a_damaged_file_says_one_line_or_carries_on(tmp_path, monkeypatch, worlds, kind, how):
    mine, other = worlds
    world = _copy(mine, tmp_path / "mine")
    monkeypatch.chdir(world["root"])  # a pipeline file writes below the folder it runs in
    where, readers = KINDS[kind]
    target = where(world)
    original = where(mine).read_bytes() if where(mine).exists() else where(mine).with_suffix("").read_bytes()
    if kind in ("cache.h5", "cache.partial") and how == "wrong content":
        _wrong_cache(target, kind)
    else:
        target.write_bytes(damaged(kind, how, original, _read(where(other))))
    if kind == "cache.partial":  # what an interrupted extraction left, and no finished cache: extract resumes from it
        world["cache"].unlink()
    for reader in readers:
        result = invoke(*command(reader, world))
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert "Traceback" not in result.output, (reader, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), (reader, repr(result.exception))
        if result.exit_code != 0:
            errors = [line for line in lines if line.startswith("Error: ")]
            assert result.exit_code == 2 and len(errors) == 1, (reader, result.output)


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else path.with_suffix("").read_bytes()


def _copy(world: dict, root: Path) -> dict:
    shutil.copytree(world["root"], root)
    return {k: root / v.relative_to(world["root"]) if isinstance(v, Path) else v for k, v in world.items()}


def _wrong_cache(target: Path, kind: str) -> None:
    """A valid HDF5 cache whose contents lie: NaN rows, a tap wider than declared, labels of another length."""
    source = target if target.exists() else target.with_name(target.name.removesuffix(".partial"))
    if source != target:
        shutil.copy(source, target)
    with h5py.File(target, "r+") as f:
        data = f["train/taps/stage1"]
        block = data[:4]
        block[:] = np.nan
        data[:4] = block
        del f["test/taps/stage2"]
        f["test/taps"].create_dataset("stage2", shape=(40, 10**9), dtype="float16", chunks=(1, 1 << 20))
        labels = f["test/labels"][:]
        del f["test/labels"]
        f["test"].create_dataset("labels", data=labels[:5])
        if kind == "cache.partial":
            f.attrs["complete"] = False


# --- the data readers and the rank folder (issue 38): each source's own files, damaged every way -------------

DATA_FLAGS = ["--backbone", "tiny", "--weights", "random", "--image-size", "16", "--device", "cpu", "--dtype",
              "float32", "--num-workers", "0", "-q"]


@pytest.fixture(scope="module")
def data_world(tmp_path_factory):
    """One small dataset in every on-disk source format, and a finished ranking."""
    import source_fixtures as fx
    from cifar_fixture import write_cifar10

    root = tmp_path_factory.mktemp("data-world")
    items = fx.sample_images(per_class=4)
    folder = fx.as_folder(root / "folder", items)
    fx.as_manifest(root / "m.csv", folder, items)
    fx.as_shards(root / "shards", items, per_shard=20)
    fx.hf_dataset(items).save_to_disk(root / "hf")
    write_cifar10(root / "cifar", per_batch=4, n_test=6)
    ranked = invoke("rank", "--backbone", "tiny", *DATA_FLAGS[2:], "--limit-train", "60", "--limit-test", "20",
                    "--score", "hscore", "--cache-dir", root / "cache", "--runs-dir", root / "runs")
    assert ranked.exit_code == 0, ranked.output
    return root


DATA_KINDS = {  # kind -> (the file below the world, the command that reads it)
    "manifest.csv": ("m.csv", ["extract", "--data-dir", "m.csv"]),
    "shard.tar": ("shards/train-000000.tar", ["extract", "--data-dir", "shards"]),
    "hf state.json": ("hf/train/state.json", ["extract", "--data-dir", "hf"]),
    "hf data.arrow": ("hf/train/data-00000-of-00001.arrow", ["extract", "--data-dir", "hf"]),
    "cifar batch": ("cifar/cifar-10-batches-py/data_batch_2", ["extract", "--dataset", "cifar10", "--data-dir",
                                                              "cifar"]),
    "rank rows.jsonl": ("runs/ranks/*/rows.jsonl", ["rank", "--backbone", "tiny", "--limit-train", "60",
                                                     "--limit-test", "20", "--score", "hscore", "--runs-dir", "runs"]),
}


def _data_wrong(kind: str, original: bytes) -> bytes:
    """The right format holding the wrong things."""
    if kind == "manifest.csv":
        return b"path,label\n../../../../dev/zero,NA\n" + original.split(b"\n", 1)[1]
    if kind == "shard.tar":
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            for name, data in (("a.png", b"\x89PNG not really"), ("a.cls", b"[1]"), ("b.cls", b"--1")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return out.getvalue()
    if kind == "hf state.json":
        return json.dumps({"_data_files": [{"filename": "/etc/passwd"}], "_split": 3}).encode()
    if kind == "cifar batch":
        return pickle.dumps({"data": "pixels", "labels": [[1], {"a": 2}]}, protocol=2)
    if kind == "rank rows.jsonl":
        return (json.dumps({"model": "tiny", "status": "ok", "taps": 5}) + "\n" +
                json.dumps({"model": "tiny", "status": "ok", "taps": [{"tap": "x", "width": "wide"}]}) + "\n").encode()
    return original[:200] + bytes(range(256)) * 4  # an Arrow stream whose batches are noise


DATA_CASES = [(kind, how) for kind in DATA_KINDS for how in ("empty", "truncated", "random", "wrong content")]


@pytest.mark.parametrize(("kind", "how"), DATA_CASES, ids=[f"{k}-{h}" for k, h in DATA_CASES])
def test_every_data_reader_of_a_damaged_file_says_one_line_or_carries_on(tmp_path, data_world, kind, how):
    root = tmp_path / "w"
    shutil.copytree(data_world, root, symlinks=True)
    where, args = DATA_KINDS[kind]
    [target] = root.glob(where)
    original = target.read_bytes()
    target.write_bytes(_data_wrong(kind, original) if how == "wrong content" else
                       damaged(kind, how, original, original))
    args = [root / a if (root / a).exists() else a for a in args]
    result = invoke(*args, *[f for f in DATA_FLAGS if f not in args], "--cache-dir", root / "c2")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code != 0:
        errors = [line for line in lines if line.startswith("Error: ")]
        assert result.exit_code == 2 and len(errors) == 1, result.output
    assert not list((root / "c2").rglob("*.partial"))
